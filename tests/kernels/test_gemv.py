"""The decode-sized matmul kernel against torch: every row count, ragged N and K, both M = 1
variants; its fused SiLU-and-mul prologue against the unfused kernels and torch."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from pagedserve.layers.triton_gemv import (GemvConfig, add_gemv, gemv, rms_norm_gemv,  # noqa: E402
                                           silu_and_mul_gemv, use_gemv)
from pagedserve.layers.triton_ops import rms_norm, silu_and_mul  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's CPU interpreter mishandles bfloat16 loads/stores: bf16 runs on the GPU machine only.
DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _check(m: int, n: int, k: int, dtype: torch.dtype, config: GemvConfig, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(DEVICE, dtype)
    out = gemv(x, w, config)
    assert out.shape == (m, n) and out.dtype == dtype
    ref = (x.float() @ w.float().T).to(dtype)
    # fp32 accumulation, one rounding: at most one ulp of the output dtype from the reference
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16])
def test_gemv_rows(m: int, dtype: torch.dtype) -> None:
    _check(m, 96, 512, dtype, GemvConfig(block_n=32, block_k=128, num_warps=4, num_stages=2), seed=m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [2, 17, 33, 64])
@pytest.mark.parametrize("swap", [False, True])
def test_gemv_rows_padded_to_16_32_64(m: int, swap: bool, dtype: torch.dtype) -> None:
    """2-64 rows through tl.dot on 16 / 32 / 64 padded rows, plain (x @ w.T) or swapped (the weight
    slab as the tall operand: (w @ x.T).T), ragged N and K."""
    _check(m, 100 if swap else 50, 300, dtype, GemvConfig(64 if swap else 16, 128, 4, 2, swap), seed=m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(96, 512), (50, 300)])
def test_gemv_one_row_ragged(n: int, k: int, dtype: torch.dtype) -> None:
    """M = 1 (FMAs, no padded rows, no tl.dot: block_n may be below 16)."""
    _check(1, n, k, dtype, GemvConfig(block_n=8, block_k=128, num_warps=4, num_stages=2), seed=k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(50, 300), (33, 520), (64, 1024)])
def test_gemv_ragged(n: int, k: int, dtype: torch.dtype) -> None:
    """N not a multiple of the column block, K not a multiple of the K block."""
    _check(2, n, k, dtype, GemvConfig(block_n=16, block_k=128, num_warps=4, num_stages=2), seed=n + k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_default_config(dtype: torch.dtype) -> None:
    _check(1, 40, 1536, dtype, GemvConfig(), seed=7)


def test_use_gemv_only_where_it_pays() -> None:
    """CPU tensors, float32, no rows or more than MAX_ROWS, or a small weight go to F.linear."""
    small = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert not use_gemv(torch.zeros(1, 64, dtype=torch.bfloat16), small)
    if DEVICE == "cuda":
        big = torch.zeros(8192, 2048, dtype=torch.bfloat16, device="cuda")   # 32 MiB
        assert use_gemv(torch.zeros(16, 2048, dtype=torch.bfloat16, device="cuda"), big)
        assert not use_gemv(torch.zeros(17, 2048, dtype=torch.bfloat16, device="cuda"), big)
        assert not use_gemv(torch.zeros(17, 2048, dtype=torch.bfloat16, device="cuda"), big, max_rows=64)
        # a row bucket's entry decides: a launch (the gemv), None (cuBLAS)
        from pagedserve.layers import triton_gemv
        saved = dict(triton_gemv.MCONFIGS)
        try:
            triton_gemv.MCONFIGS.update({(32, 8192, 2048): GemvConfig(64, 256, 4, 3, True), (16, 8192, 2048): None})
            assert use_gemv(torch.zeros(17, 2048, dtype=torch.bfloat16, device="cuda"), big, max_rows=64)
            assert not use_gemv(torch.zeros(17, 2048, dtype=torch.bfloat16, device="cuda"), big, max_rows=16)
            assert not use_gemv(torch.zeros(16, 2048, dtype=torch.bfloat16, device="cuda"), big)
            assert triton_gemv.config_for(20, 8192, 2048) == GemvConfig(64, 256, 4, 3, True)
        finally:
            triton_gemv.MCONFIGS.clear()
            triton_gemv.MCONFIGS.update(saved)
        assert not use_gemv(torch.zeros(0, 2048, dtype=torch.bfloat16, device="cuda"), big)
        # a shape neither table names, under MIN_WEIGHT_BYTES (14 MiB): cuBLAS at 2 rows and at one
        assert not use_gemv(torch.zeros(2, 2048, dtype=torch.bfloat16, device="cuda"), big[:3584])
        # one row into a swept shape (llama-1b's qkv, 12 MiB): the gemv won there
        assert use_gemv(torch.zeros(1, 2048, dtype=torch.bfloat16, device="cuda"), big[:3072])
        assert not use_gemv(torch.zeros(1, 2048, dtype=torch.bfloat16, device="cuda"), big[:3584])
        # and a tensor-parallel shard (llama-8b TP=2's o, 16 MiB)
        assert use_gemv(torch.zeros(1, 2048, dtype=torch.bfloat16, device="cuda"), big[:4096])


def test_launch_shape_by_row_bucket() -> None:
    """One row: the one-row table; 2-64 rows: the row bucket's entry (rows round up to 2 / 4 / 8 /
    16 / 32 / 48 / 64); a shape no table names: swapped where N > K, the plain default otherwise."""
    from pagedserve.layers import triton_gemv
    assert [triton_gemv.row_bucket(m) for m in (2, 3, 5, 9, 17, 33, 49, 64)] == [2, 4, 8, 16, 32, 48, 64, 64]
    assert triton_gemv.config_for(1, 4096, 4096) == triton_gemv.CONFIGS[(4096, 4096)]
    assert triton_gemv.config_for(3, 6144, 4096) == triton_gemv.MCONFIGS[(4, 6144, 4096)]
    assert triton_gemv.config_for(40, 128256, 4096) == triton_gemv.MCONFIGS[(48, 128256, 4096)]
    assert triton_gemv.MCONFIGS[(64, 4096, 4096)] is None   # cuBLAS won there
    assert triton_gemv.config_for(4, 9000, 2048) == triton_gemv.WIDE_DEFAULT
    assert triton_gemv.config_for(4, 2048, 9000) == triton_gemv.DEFAULT_CONFIG
    assert all(c is None or (c.block_n >= 64 if c.swap else c.block_n >= 16) for c in triton_gemv.MCONFIGS.values())


def test_a_launch_this_gpu_cannot_fit_goes_to_torch(monkeypatch) -> None:
    """A launch refused for shared memory (a GPU smaller than the H200 the tables were tuned on)
    falls back to torch's matmul (SiLU-and-mul first for the prologue launch), and is not tried again."""
    from triton.runtime.errors import OutOfResources
    from pagedserve.layers import triton_gemv
    calls = []

    class Refusing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(kwargs["BLOCK_M"])
                raise OutOfResources(300_000, 232_448, "shared memory")
            return launch

    monkeypatch.setattr(triton_gemv, "_gemv_kernel", Refusing())
    monkeypatch.setattr(triton_gemv, "_UNFIT", set())
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 64, generator=gen).to(DEVICE, torch.float16)
    w = (torch.randn(40, 64, generator=gen) * 0.05).to(DEVICE, torch.float16)
    cfg = GemvConfig(64, 128, 4, 5, True)
    for _ in range(2):
        assert torch.equal(gemv(x, w, cfg), torch.nn.functional.linear(x, w))
    assert calls == [16]   # refused once, then remembered
    gate_up = torch.randn(3, 128, generator=gen).to(DEVICE, torch.float16)
    assert torch.equal(silu_and_mul_gemv(gate_up, w, cfg), torch.nn.functional.linear(silu_and_mul(gate_up), w))
    assert calls == [16, 16] and len(triton_gemv._UNFIT) == 2   # the prologue launch is its own


def test_gemv_rejects_bad_input() -> None:
    w = torch.zeros(8, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="rows"):
        gemv(torch.zeros(65, 64, dtype=torch.float16, device=DEVICE), w)
    with pytest.raises(ValueError, match="dtype"):
        gemv(torch.zeros(1, 64, dtype=torch.float32, device=DEVICE), w)
    with pytest.raises(ValueError, match="weight"):
        gemv(torch.zeros(1, 32, dtype=torch.float16, device=DEVICE), w)


SMALL = GemvConfig(block_n=16, block_k=128, num_warps=4, num_stages=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 40, 512), (1, 33, 300), (3, 24, 256)])
def test_silu_and_mul_gemv(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    """The activation in the prologue, bit for bit the SiLU-and-mul kernel then the gemv (the
    same roundings, the same accumulation order), and torch within tolerance."""
    gen = torch.Generator().manual_seed(m + n + k)
    gate_up = torch.randn(m, 2 * k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(DEVICE, dtype)
    y = silu_and_mul_gemv(gate_up, w, SMALL)
    assert torch.equal(y, gemv(silu_and_mul(gate_up), w, SMALL))
    act = torch.nn.functional.silu(gate_up[:, :k]) * gate_up[:, k:]
    torch.testing.assert_close(y, (act.float() @ w.float().T).to(dtype), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,inner", [(96, 256), (100, 300), (64, 512)])
def test_norm_chain_is_the_norm_kernel_bit_for_bit(hidden: int, inner: int, dtype: torch.dtype) -> None:
    """add_gemv (o / down: the output added into the residual row, its fp64 sum of squares gathered
    across the programs) then rms_norm_gemv (the next qkv / gate_up: RMSNorm in the prologue from
    that sum): the same bits as the gemv, the norm kernel with its residual add, and the gemv."""
    gen = torch.Generator().manual_seed(hidden + inner)
    x = torch.randn(1, inner, generator=gen).to(DEVICE, dtype)
    w_out = (torch.randn(hidden, inner, generator=gen) * 0.05).to(DEVICE, dtype)
    w_next = (torch.randn(2 * inner, hidden, generator=gen) * 0.05).to(DEVICE, dtype)
    norm_w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)
    residual0 = (3 * torch.randn(1, hidden, generator=gen)).to(DEVICE, dtype)

    y = gemv(x, w_out, SMALL)
    residual_ref = residual0.clone()
    next_ref = gemv(rms_norm(y, norm_w, 1e-5, residual_ref), w_next, SMALL)

    for wait_inputs in (False, True):   # True on sm_90+: a PDL launch, its first slice loaded before x
        residual = residual0.clone()
        sum_sq = torch.zeros(1, dtype=torch.float64, device=DEVICE)
        assert add_gemv(x, w_out, residual, sum_sq, config=SMALL, wait_inputs=wait_inputs) is residual
        assert torch.equal(residual, residual_ref)
        assert sum_sq.item() == residual.double().square().sum().item()
        assert torch.equal(rms_norm_gemv(residual, norm_w, 1e-5, sum_sq, w_next, SMALL, launch_dependents=True),
                           next_ref)
        assert torch.equal(residual, residual_ref)   # the prologue only reads it


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,inner,block_n", [(96, 256, 8), (100, 300, 16), (64, 36, 32)])
def test_gate_up_silu_epilogue_is_the_silu_kernel_bit_for_bit(hidden: int, inner: int, block_n: int,
                                                             dtype: torch.dtype) -> None:
    """rms_norm_gemv(..., silu_out=True) on a [gate | up] weight: each program's lane pairs take gate
    row i and up row i (ragged: the last program's pairs past I masked), the outputs rounded, then
    silu(gate) * up as the SiLU-and-mul kernel rounds it: the same bits as gate_up then that kernel."""
    gen = torch.Generator().manual_seed(hidden + inner + block_n)
    residual = (3 * torch.randn(1, hidden, generator=gen)).to(DEVICE, dtype)
    norm_w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)
    w = (torch.randn(2 * inner, hidden, generator=gen) * 0.05).to(DEVICE, dtype)
    sum_sq = residual.double().square().sum().reshape(1)
    config = GemvConfig(block_n, 64, 4, 2)
    gate_up = rms_norm_gemv(residual, norm_w, 1e-5, sum_sq, w, config)
    act = rms_norm_gemv(residual, norm_w, 1e-5, sum_sq, w, config, silu_out=True)
    assert act.shape == (1, inner) and act.dtype == dtype
    assert torch.equal(act, silu_and_mul(gate_up))
    with pytest.raises(ValueError, match="gate \\| up"):
        rms_norm_gemv(residual, norm_w, 1e-5, sum_sq, w[:-1], config, silu_out=True)


def test_norm_chain_rejects_bad_input() -> None:
    w = torch.zeros(8, 64, dtype=torch.float16, device=DEVICE)
    row = torch.zeros(1, 64, dtype=torch.float16, device=DEVICE)
    sum_sq = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="one row"):
        rms_norm_gemv(torch.zeros(2, 64, dtype=torch.float16, device=DEVICE), row[0], 1e-5, sum_sq, w)
    with pytest.raises(ValueError, match="fp64"):
        rms_norm_gemv(row, row[0], 1e-5, sum_sq.float(), w)
    with pytest.raises(ValueError, match="norm_weight"):
        rms_norm_gemv(row, row[0, :32], 1e-5, sum_sq, w)
    with pytest.raises(ValueError, match="residual"):
        add_gemv(row, w, torch.zeros(1, 8, dtype=torch.float32, device=DEVICE), sum_sq)
    with pytest.raises(ValueError, match="columns"):
        add_gemv(row, w, torch.zeros(1, 16, dtype=torch.float16, device=DEVICE), sum_sq)


def test_prologue_launchers_reject_bad_input() -> None:
    w = torch.zeros(8, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="rows"):
        gemv(torch.zeros(65, 64, dtype=torch.float16, device=DEVICE), w)
    with pytest.raises(ValueError, match="gate_up"):
        silu_and_mul_gemv(torch.zeros(1, 63, dtype=torch.float16, device=DEVICE), w)
    with pytest.raises(ValueError, match="weight"):
        silu_and_mul_gemv(torch.zeros(1, 64, dtype=torch.float16, device=DEVICE), w)


_COMPILE_FOR_SM90 = """
from pagedserve.layers.triton_gemv import _gemv_kernel
for prologue, block_m, swap, add in [(0, 1, False, False), (0, 16, False, False), (1, 1, False, False),
                                     (0, 32, False, False), (0, 64, True, False), (0, 16, True, False),
                                     (2, 1, False, False), (0, 1, False, True)]:
    build(_gemv_kernel, dict(PROLOGUE=prologue, BLOCK_M=block_m, BLOCK_N=8 if block_m == 1 else 64,
                             BLOCK_K=256, EVEN_K=False, NUM_STAGES=4, LIBDEVICE=True, SWAP=swap, ADD_OUT=add,
                             SILU_OUT=False, LAUNCH_DEPENDENTS=False, WAIT_INPUTS=False),
          dict(sum_in_ptr="*fp64", sum_out_ptr="*fp64"))
build(_gemv_kernel, dict(PROLOGUE=2, BLOCK_M=1, BLOCK_N=32, BLOCK_K=256, EVEN_K=True, NUM_STAGES=3, LIBDEVICE=True,
                         SWAP=False, ADD_OUT=False, SILU_OUT=True, LAUNCH_DEPENDENTS=False, WAIT_INPUTS=False),
      dict(sum_in_ptr="*fp64", sum_out_ptr="*fp64"))
# the norm chain's qkv launch, which lets the decode attention after it be placed as it starts
k = build(_gemv_kernel, dict(PROLOGUE=2, BLOCK_M=1, BLOCK_N=4, BLOCK_K=512, EVEN_K=True, NUM_STAGES=3,
                             LIBDEVICE=True, SWAP=False, ADD_OUT=False, SILU_OUT=False, LAUNCH_DEPENDENTS=True,
                             WAIT_INPUTS=False),
          dict(sum_in_ptr="*fp64", sum_out_ptr="*fp64"))
ptx = k.asm["ptx"]
assert "griddepcontrol.launch_dependents" in ptx and ptx.index("griddepcontrol.launch_dependents") < ptx.index("ld.global")
# o's launch after the decode attention: its first weight slice loaded before it waits, x after
k = build(_gemv_kernel, dict(PROLOGUE=0, BLOCK_M=1, BLOCK_N=4, BLOCK_K=512, EVEN_K=True, NUM_STAGES=3,
                             LIBDEVICE=True, SWAP=False, ADD_OUT=True, SILU_OUT=False, LAUNCH_DEPENDENTS=False,
                             WAIT_INPUTS=True), dict(sum_in_ptr="*fp64", sum_out_ptr="*fp64"))
ptx = k.asm["ptx"]
wait = ptx.index("griddepcontrol.wait")
assert ptx.count("griddepcontrol.wait") == 1 and "ld.global" in ptx[:wait] and "ld.global" in ptx[wait:]
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU tests compile these kernels for the device itself")
def test_kernels_compile_for_sm90() -> None:
    """Every gemv variant to a cubin for sm_90 (tests/kernels/sm90_compile.py), the norm chain's too
    (RMSNorm prologue; the residual add and the fp64 atomic sum in the epilogue)."""
    pytest.importorskip("triton.backends.nvidia")
    from tests.kernels.sm90_compile import run
    proc = run(_COMPILE_FOR_SM90)
    assert proc.returncode == 0, proc.stderr[-3000:]
