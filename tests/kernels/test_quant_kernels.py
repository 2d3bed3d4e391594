"""The quantization kernels against the torch reference (Triton's interpreter on CPU, tiny
shapes): the W4A16 GEMV / GEMM / dequantize paths, with and without act-order g_idx, and
per-token activation quantization (int8 exactly; FP8 scales - the interpreter's own fp8
cast rounds differently from the GPU's, which benchmarks/quant_gpu.py checks natively)."""
from __future__ import annotations

import re

import pytest
import torch

from pagedserve.layers.quantization.act_quant import FP8, quantize_per_token_torch
from pagedserve.layers.quantization.int4 import dequantize_int4, pack_int32, unpack_int32
from pagedserve.layers.quantization.triton_act_quant import quantize_per_token_triton
from pagedserve.layers.quantization import triton_w4a16, triton_w4a16_gemv
from pagedserve.layers.quantization.triton_w4a16 import GemmConfig, w4a16_gemm, w4a16_matmul
from pagedserve.layers.quantization.triton_w4a16_gemv import SILU_AND_MUL, GemvConfig, w4a16_gemv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_pack_round_trips():
    q = torch.randint(0, 16, (64, 24))
    assert torch.equal(unpack_int32(pack_int32(q, 0), 0), q)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(unpack_int32(pack_int32(q, 1, order), 1, order), q)


@pytest.mark.parametrize("path", ["gemv", "gemm", "dequant"])
@pytest.mark.parametrize("act_order", [False, True])
def test_w4a16_paths_match_the_dequantized_reference(path, act_order):
    torch.manual_seed(0)
    k, n, group = 128, 40, 32
    qweight = pack_int32(torch.randint(0, 16, (k, n)), 0).to(DEVICE)
    scales = (torch.rand(k // group, n) * 0.1).to(DEVICE)
    zeros = torch.randint(0, 16, (k // group, n)).float().to(DEVICE)
    g_idx = (torch.randperm(k) // group).to(torch.int32).to(DEVICE) if act_order else None
    weight = dequantize_int4(qweight, scales, zeros, group, g_idx, torch.float32)
    for rows in (1, 19):
        x = torch.randn(rows, k, device=DEVICE)
        out = w4a16_matmul(x, qweight, scales, zeros, group, g_idx, path)
        torch.testing.assert_close(out, x @ weight, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", [GemvConfig(block_n=32), GemvConfig(block_n=16, programs_per_sm=0),
                                    GemvConfig(block_n=16, words=8, fixup=False),
                                    GemvConfig(block_n=32, dot=True), GemvConfig(block_n=16, dot=True, programs_per_sm=0),
                                    GemvConfig(block_n=32, words=8, atomic=True), GemvConfig(block_n=16, atomic=True),
                                    GemvConfig(block_n=32, words=8, prefetch=True, evict=True),
                                    GemvConfig(block_n=16, words=8, prefetch=True, programs_per_sm=0),
                                    GemvConfig(block_n=32, words=8, atomic=True, prefetch=True),
                                    GemvConfig(block_n=16, words=8, programs_per_sm=64, evict=True)],
                         ids=["fma-split", "fma-nosplit", "fma-words8-sumkernel", "dot-split", "dot-nosplit",
                              "fma-atomic", "fma-atomic-words16", "fma-prefetch-evict", "fma-prefetch-nosplit",
                              "fma-atomic-prefetch", "fma-split-every-block"])
def test_decode_gemv_matches_the_dequantized_reference(config, dtype):
    """The 128-row-block GEMV: symmetric (zero 8) and asymmetric zeros, groups of 128 and
    256 (two blocks in one group), 1 and 5 rows, N not a multiple of BLOCK_N, K split over
    programs or not."""
    torch.manual_seed(1)
    k, n = 256, 40
    for group, symmetric in ((128, True), (256, False)):
        qweight = pack_int32(torch.randint(0, 16, (k, n)), 0).to(DEVICE)
        scales = (torch.rand(k // group, n) * 0.1 + 0.01).to(dtype).to(DEVICE)
        zeros = (torch.full((k // group, n), 8) if symmetric else torch.randint(0, 16, (k // group, n)))
        zeros = zeros.to(dtype).to(DEVICE)
        weight = dequantize_int4(qweight, scales, zeros, group, None, torch.float32)
        for rows in (1, 5):
            x = torch.randn(rows, k, device=DEVICE).to(dtype)
            out = w4a16_gemv(x, qweight, scales, zeros, group, config)
            assert out.dtype == dtype and out.shape == (rows, n)
            if config.atomic:   # the sums it added into are left zero for the next launch
                assert not any(s.count_nonzero() for s in triton_w4a16_gemv._ZERO_SUMS.values())
            else:   # split K summed in split order: the same bits every run
                assert torch.equal(out, w4a16_gemv(x, qweight, scales, zeros, group, config))
            tol = 1e-4 if dtype == torch.float32 else 2e-3
            torch.testing.assert_close(out.float(), x.float() @ weight, rtol=tol, atol=tol * 10)


def _asymmetric_int4(k: int, n: int, group: int, dtype: torch.dtype):
    """Random packed int4 [K/8, N], scales and zero points (0..15) per group of K rows."""
    qweight = pack_int32(torch.randint(0, 16, (k, n)), 0).to(DEVICE)
    scales = (torch.rand(k // group, n) * 0.1 + 0.01).to(dtype).to(DEVICE)
    zeros = torch.randint(0, 16, (k // group, n)).to(dtype).to(DEVICE)
    return qweight, scales, zeros


@pytest.mark.parametrize("scale_w", [False, True], ids=["scale-sums", "scale-weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_w4_gemm_matches_the_dequantized_reference(dtype, scale_w):
    """The one-load-per-word GEMM (nibbles joined into a [128, BLOCK_N] tile per block):
    rows and columns not multiples of the tile, two groups of 128 and one of 256, K whole or
    split over programs; the scale on each block's sums or on the weights."""
    torch.manual_seed(3)
    k, n = 256, 40
    for group in (128, 256):
        qweight, scales, zeros = _asymmetric_int4(k, n, group, dtype)
        weight = dequantize_int4(qweight, scales, zeros, group, None, torch.float32)
        for rows in (1, 19, 70):
            x = torch.randn(rows, k, device=DEVICE).to(dtype)
            for split in (0, 8):   # 8 programs per SM: K split in two (8 fake SMs on CPU)
                out = w4a16_gemm(x, qweight, scales, zeros, group,
                                 GemmConfig(32, 32, programs_per_sm=split, scale_w=scale_w))
                tol = 1e-4 if dtype == torch.float32 else 2e-3
                torch.testing.assert_close(out.float(), x.float() @ weight, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fma_gemv_silu_and_mul_prologue(dtype):
    """silu(gate) * up fused into the FMA GEMV equals SiluAndMul's output (same rounding)
    through the unfused GEMV; split K both ways (bf16: benchmarks/w4_gpu.py on the GPU, the
    interpreter's bf16 products are not the GPU's)."""
    from pagedserve.layers.activation import SiluAndMul
    torch.manual_seed(5)
    k, n = 256, 32
    qweight = pack_int32(torch.randint(0, 16, (k, n)), 0).to(DEVICE)
    scales = (torch.rand(2, n) * 0.1 + 0.01).to(dtype).to(DEVICE)
    zeros = torch.randint(0, 16, (2, n)).to(dtype).to(DEVICE)
    gate_up = torch.randn(1, 2 * k, device=DEVICE).to(dtype)
    for config in (GemvConfig(block_n=32), GemvConfig(block_n=32, programs_per_sm=0),
                   GemvConfig(block_n=16, atomic=True), GemvConfig(block_n=32, words=8, prefetch=True)):
        ref = w4a16_gemv(SiluAndMul()(gate_up), qweight, scales, zeros, 128, config)
        out = w4a16_gemv(gate_up[:, :k], qweight, scales, zeros, 128, config, prologue=SILU_AND_MUL)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fma_gemv_rms_norm_prologue(dtype, monkeypatch):
    """RMSNorm(x + residual) fused into the FMA GEMV (the row's rsqrt applied to the sums,
    split K summed in the kernel) against RMSNorm then the matmul; x + residual returned."""
    from pagedserve.layers.norm import RMSNorm
    torch.manual_seed(6)
    k, n = 256, 32
    qweight = pack_int32(torch.randint(0, 16, (k, n)), 0).to(DEVICE)
    scales = (torch.rand(2, n) * 0.1 + 0.01).to(dtype).to(DEVICE)
    zeros = torch.randint(0, 16, (2, n)).to(dtype).to(DEVICE)
    weight = dequantize_int4(qweight, scales, zeros, 128, None, torch.float32)
    norm = RMSNorm(k, 1e-5, dtype).to(DEVICE)
    norm.weight.data = (torch.rand(k) + 0.5).to(dtype).to(DEVICE)
    x, residual = (torch.randn(1, k, device=DEVICE).to(dtype) * 3 for _ in range(2))
    for config in (GemvConfig(block_n=32), GemvConfig(block_n=32, programs_per_sm=0),
                   GemvConfig(block_n=16, words=8, atomic=True), GemvConfig(block_n=16, words=8, prefetch=True)):
        monkeypatch.setitem(triton_w4a16_gemv.TUNED, (1, k, n), config)
        for res in (None, residual):
            out, h = triton_w4a16_gemv.w4a16_rms_norm_gemv(x, res, norm.weight, norm.eps, qweight, scales, zeros, 128, None)
            normed, h_ref = (norm(x), x) if res is None else norm(x, res.clone())
            assert torch.equal(h, h_ref)
            ref = normed.float() @ weight   # fp16: x normalised and rounded twice there, not here
            assert (out.float() - ref).norm() / ref.norm() < (1e-6 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fma_gemv_hand_offs_chain_as_the_rounded_launches(dtype, monkeypatch):
    """One decoder layer's o -> gate_up (RMSNorm + residual) -> down (SiLU) with every output
    handed on in fp32 (atomic adds into zeroed buffers, no fix-up; gate_up's rsqrt applied by
    down) against the same launches rounding each output: same residual bits, outputs within
    the rounding the hand-off leaves out; the sums and squares landed in the buffers given."""
    from pagedserve.layers.activation import SiluAndMul
    from pagedserve.layers.norm import RMSNorm
    torch.manual_seed(9)
    hidden, inter = 256, 384

    def int4(k, n):
        return (pack_int32(torch.randint(0, 16, (k, n)), 0).to(DEVICE),
                (torch.rand(k // 128, n) * 0.02 + 0.01).to(dtype).to(DEVICE),
                torch.randint(0, 16, (k // 128, n)).to(dtype).to(DEVICE))
    o, gate_up, down = int4(hidden, hidden), int4(hidden, 2 * inter), int4(inter, hidden)
    norm = RMSNorm(hidden, 1e-5, dtype).to(DEVICE)
    norm.weight.data = (torch.rand(hidden) + 0.5).to(dtype).to(DEVICE)
    attn, residual = (torch.randn(1, hidden, device=DEVICE).to(dtype) for _ in range(2))
    for config in (GemvConfig(block_n=32, words=8, atomic=True), GemvConfig(block_n=64, words=8, prefetch=True),
                   GemvConfig(block_n=32, programs_per_sm=0)):
        for shape in ((hidden, hidden), (hidden, 2 * inter), (inter, hidden)):
            monkeypatch.setitem(triton_w4a16_gemv.TUNED, (1, *shape), config)
        # rounded: every launch's output in the model dtype
        h1 = w4a16_gemv(attn, *o, 128, config)
        gu_ref, res_ref = triton_w4a16_gemv.w4a16_rms_norm_gemv(h1, residual, norm.weight, norm.eps, *gate_up, 128, None)
        out_ref = triton_w4a16_gemv.w4a16_silu_and_mul_gemv(gu_ref, *down, 128, None)
        # handed on: fp32 sums into zeroed buffers
        buffers = torch.zeros(3, 2 * inter + 1, device=DEVICE)
        h1_f = w4a16_gemv(attn, *o, 128, config, handoff=buffers[0:1, :hidden])
        assert h1_f.dtype == torch.float32 and h1_f.data_ptr() == buffers.data_ptr()
        torch.testing.assert_close(h1_f.to(dtype), h1, rtol=0, atol=2e-3 if dtype == torch.float16 else 1e-5)
        gu, res = triton_w4a16_gemv.w4a16_rms_norm_gemv(h1_f, residual, norm.weight, norm.eps, *gate_up, 128, None,
                                                        handoff=buffers[1:2])
        assert res.dtype == dtype
        assert torch.equal(res, (h1_f + residual.float()).to(dtype))   # the residual rounded once
        squares, inv_k, eps = gu.w4a16_unnormed
        torch.testing.assert_close(squares, res.float().pow(2).sum(1), rtol=1e-5, atol=0)
        assert inv_k == 1 / hidden and eps == norm.eps
        gu_normed = gu * torch.rsqrt(squares * inv_k + eps)[:, None]
        tol = 1e-4 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(gu_normed.to(dtype).float(), gu_ref.float(), rtol=tol, atol=tol)
        out = triton_w4a16_gemv.w4a16_silu_and_mul_gemv(gu, *down, 128, None, handoff=buffers[2:3, :hidden])
        ref = SiluAndMul()(gu_normed).float() @ dequantize_int4(*down, 128, None, torch.float32)
        assert (out - ref).norm() / ref.norm() < 1e-5
        assert (out - out_ref.float()).norm() / out_ref.float().norm() < (1e-5 if dtype == torch.float32 else 3e-3)
        with pytest.raises(RuntimeError, match="hand-off"):   # nothing but down's prologue may read gate_up's
            triton_w4a16_gemv.w4a16_silu_and_mul_gemv(gu, *down[:2], down[2], 64, None)


def test_auto_path_takes_the_tuned_gemm(monkeypatch):
    """w4a16_matmul's auto path runs _w4_gemm_kernel for a (rows bucket, K, N) in GEMM_TUNED."""
    torch.manual_seed(4)
    k, n = 128, 32
    qweight = pack_int32(torch.randint(0, 16, (k, n)), 0).to(DEVICE)
    scales = (torch.rand(1, n) * 0.1 + 0.01).to(DEVICE)
    zeros = torch.randint(0, 16, (1, n)).float().to(DEVICE)
    calls = []
    monkeypatch.setitem(triton_w4a16.GEMM_TUNED, (64, k, n), GemmConfig(32, 32))
    monkeypatch.setattr(triton_w4a16, "w4a16_gemm", lambda *args: calls.append(args[-1]) or torch.zeros(40, n))
    w4a16_matmul(torch.randn(40, k, device=DEVICE), qweight, scales, zeros, 128)
    assert calls == [GemmConfig(32, 32)]
    # 257-512 rows: the 512 bucket's launch where tuned, else dequantize + cuBLAS
    monkeypatch.setitem(triton_w4a16.GEMM_TUNED, (512, k, n), GemmConfig(64, 32))
    w4a16_matmul(torch.randn(300, k, device=DEVICE), qweight, scales, zeros, 128)
    assert calls == [GemmConfig(32, 32), GemmConfig(64, 32)]
    x = torch.randn(513, k, device=DEVICE)
    out = w4a16_matmul(x, qweight, scales, zeros, 128)
    assert len(calls) == 2
    torch.testing.assert_close(out, x @ dequantize_int4(qweight, scales, zeros, 128, None, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_dequantization_is_the_reference_weight(dtype):
    """dequantize_w4's one-load-per-word kernel (128-row blocks inside one group) gives the
    torch reference's weight bit for bit ((q - zero) * scale in fp32, rounded once), as the
    per-element kernel does; groups of 128 and 256, N not a multiple of its block."""
    from pagedserve.layers.quantization.triton_w4a16 import dequantize_w4
    torch.manual_seed(5)
    k, n = 512, 300
    for group in (128, 256):
        qweight, scales, zeros = _asymmetric_int4(k, n, group, dtype)
        ref = dequantize_int4(qweight, scales, zeros, group, None, dtype)
        assert torch.equal(dequantize_w4(qweight, scales, zeros, group, None, dtype), ref)
        assert torch.equal(dequantize_w4(qweight, scales, zeros, group, None, dtype, generic=True), ref)


_COMPILE_SM90 = """
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pagedserve.layers.quantization import triton_w4a16 as t
from pagedserve.layers.quantization import triton_w4a16_gemv as g

POINTERS = {"qw_ptr": "*i32", "c_ptr": "*i32", "g_ptr": "*i32", "p_ptr": "*fp32", "q_ptr": "*fp32", "xq_ptr": "*fp32"}
HANDED = {"x_ptr": "*fp32", "y_ptr": "*fp32", "p_ptr": "*fp32"}   # a hand-off in or out


def compile_sm90(kernel, constants, num_warps=4, pointers=None, **options):
    constants = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.name not in constants}, **constants}
    names = [name for name in kernel.arg_names if name not in constants]
    types = {**POINTERS, **(pointers or {})}
    args = {n: types.get(n, "*bf16") if n.endswith("_ptr") else "fp32" if n in ("eps", "x_inv_k", "x_eps") else "i32"
            for n in names}
    signature = {**args, **{name: "constexpr" for name in constants}}
    order = list(kernel.arg_names)
    signature = {name: signature[name] for name in order}
    aligned = {(order.index(n),): [["tt.divisibility", 16]] for n, kind in args.items()
               if kind.startswith("*") or n.startswith("stride")}
    source = ASTSource(kernel, signature, attrs=aligned,
                       constexprs={(order.index(n),): v for n, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, **options))


fma = dict(GROUP_SIZE=128, BLOCK_N=256, WORDS=8, EVEN_N=True, SPLIT=True, PROLOGUE=3, NUM_STAGES=3, stride_qk=4096)
variants = {
    "fma": (g._w4_gemv_fma_kernel, {**fma, "PROLOGUE": 1, "EVEN_N": False, "SPLIT": False}, 4, {}),
    "fma words16": (g._w4_gemv_fma_kernel, {**fma, "WORDS": 16, "BLOCK_N": 128, "PROLOGUE": 0}, 1, {}),
    "fma atomic norm": (g._w4_gemv_fma_kernel, {**fma, "BLOCK_N": 512, "ATOMIC": True}, 2, {}),
    "fma atomic silu": (g._w4_gemv_fma_kernel, {**fma, "BLOCK_N": 512, "PROLOGUE": 1, "ATOMIC": True}, 2, {}),
    "fma split order": (g._w4_gemv_fma_kernel, {**fma, "BLOCK_N": 128, "SPLITS": 10}, 1, {}),
    "fma prefetch": (g._w4_gemv_fma_kernel, {**fma, "BLOCK_N": 128, "NUM_STAGES": 1, "ATOMIC": True, "PREFETCH": True,
                                             "EVICT": True}, 1, {}),
    "fma handoff norm": (g._w4_gemv_fma_kernel, {**fma, "SPLIT": False, "HANDOFF": True}, 1, {"pointers": HANDED}),
    "fma handoff silu": (g._w4_gemv_fma_kernel, {**fma, "SPLIT": False, "HANDOFF": True, "PROLOGUE": 4, "NUM_STAGES": 1,
                                                 "PREFETCH": True, "EVICT": True}, 2, {"pointers": HANDED}),
    "dot gemv": (g._w4_gemv_kernel, dict(GROUP_SIZE=128, BLOCK_M=16, BLOCK_N=128, IEEE=False, NUM_STAGES=3), 4, {}),
    "gemm": (t._w4_gemm_kernel, dict(GROUP_SIZE=128, BLOCK_M=64, BLOCK_N=128, IEEE=False, NUM_STAGES=3), 4, {}),
    "gemm scale_w": (t._w4_gemm_kernel, dict(GROUP_SIZE=128, BLOCK_M=64, BLOCK_N=64, IEEE=False, NUM_STAGES=4,
                                             SCALE_W=True), 4, {}),
    "dequant blocks": (t._dequant_blocks_kernel, dict(GROUP_SIZE=128, BLOCK_N=256), 4, {}),
    "dequant": (t._dequant_kernel, dict(GROUP_SIZE=128, HAS_GIDX=True, BLOCK_K=32, BLOCK_N=128), 4, {}),
    "generic": (t._w4a16_kernel, dict(GROUP_SIZE=128, HAS_GIDX=False, ONE_GROUP_PER_BLOCK=True, BLOCK_M=64,
                                      BLOCK_N=128, BLOCK_K=64, IEEE=False), 4, {}),
}
ptx = {name: compile_sm90(kernel, constants, warps, **options).asm["ptx"]
       for name, (kernel, constants, warps, options) in variants.items()}
json.dump(ptx, sys.stdout)
"""


@pytest.fixture(scope="module")
def sm90_ptx():
    """Every W4A16 kernel in a launch variant, compiled for sm_90 here (Triton + ptxas, no GPU;
    in a fresh interpreter, without TRITON_INTERPRET): {variant: PTX}."""
    pytest.importorskip("triton.backends.nvidia")
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_w4a16_kernels_compile_for_sm90(sm90_ptx):
    """The interpreter runs a kernel's Python, not Triton's compiler: what compiles is checked
    here (e.g. a jit helper's early return on a None argument ran on CPU and failed to compile)."""
    assert len(sm90_ptx) == 14 and all(".entry" in ptx for ptx in sm90_ptx.values())


def test_hand_off_launches_end_with_their_adds(sm90_ptx):
    """A hand-off launch (w4a16_handoff.py) adds its fp32 sums (and a norm's squares) with relaxed
    atomics and ends: no fence, no tile counter, no read-back of the sums."""
    for name in ("fma handoff norm", "fma handoff silu"):
        ptx = sm90_ptx[name]
        adds = re.findall(r"(?:red|atom)\.global\.gpu\.relaxed\.add\.f32", ptx)
        assert adds and "fence" not in ptx and "membar" not in ptx, name
        assert not re.search(r"atom\.global\S*\.(?:exch|add\.[su]32)", ptx), name
        assert "ld.global.cg" not in ptx, name


def test_atomic_fix_up_reads_all_sums_before_zeroing_them(sm90_ptx):
    """The atomic split-K's last program reads a tile's sums, then zeroes them for the next
    launch; Triton may map elements to threads differently for the two (it did for BLOCK_N 512
    on 2 warps, and on the H200 a thread zeroed sums another had not read yet: 7-25% errors).
    The interpreter runs programs and threads one after another and cannot show that: the
    compiled kernel must hold a barrier between the last read and the first zeroing store."""
    ptx = sm90_ptx["fma atomic norm"]
    last_read = ptx.rindex("ld.global.cg")
    first_zero = ptx.index("st.global.b32", last_read)
    assert "bar.sync" in ptx[last_read:first_zero]
    assert re.search(r"\b(atom|red)\.[\w.]*add\.f32", ptx)   # the splits' fp32 atomic adds


def test_tile_counter_reset_waits_on_nothing(sm90_ptx):
    """The last program of a split-K tile resets the tile's counter with a relaxed exchange: the
    next launch sees it (and the zeroed sums) after the kernel boundary, so no fence (an acq_rel
    exchange is a MEMBAR.GPU that waits on the program's stores before the kernel can end)."""
    for name in ("fma atomic norm", "fma split order", "fma prefetch"):
        ptx = sm90_ptx[name]
        assert "atom.global.gpu.relaxed.exch" in ptx and "acq_rel.exch" not in ptx and "fence" not in ptx


def test_split_order_fix_up_reads_every_partial_in_one_go(sm90_ptx):
    """Split K without atomics: the last program of a tile reads all SPLITS partials (4 columns
    a thread on one warp: 4 loads each) and squares with straight-line loads between its arrival
    and the counter's reset (no loop: one round trip, not one per split), summing them in split
    order (the same bits every run)."""
    ptx = sm90_ptx["fma split order"]
    arrive, reset = ptx.index("atom.global.gpu.acq_rel.add"), ptx.index("atom.global.gpu.relaxed.exch")
    fix_up = ptx[arrive:reset]
    assert len(re.findall(r"ld\.global\.cg", fix_up)) == 10 * 4 + 10
    assert not re.search(r"^\$\w+:", fix_up, re.M)   # no label: nothing branches back into it
    assert not re.search(r"\b(atom|red)\.[\w.]*add\.f32", ptx)


def test_prefetch_issues_the_next_blocks_loads_before_the_fmas(sm90_ptx):
    """PREFETCH: the loop body loads the next K block's words (8 vector loads, evict-first) before
    its first FMA on the current one, so they are in flight while it computes."""
    lines = sm90_ptx["fma prefetch"].splitlines()
    back = [i for i, line in enumerate(lines) if re.search(r"bra\s+(\$L__BB0_\d+)", line)]
    targets = {i: re.search(r"bra\s+(\$L__BB0_\d+)", lines[i]).group(1) for i in back}
    labels = {m.group(1): i for i, m in enumerate(re.match(r"(\$L__BB0_\d+):", line) for line in lines) if m}
    loop = next(i for i in back if labels[targets[i]] < i)   # the backward branch closes the K loop
    body = lines[labels[targets[loop]]:loop]
    first_fma = next(i for i, line in enumerate(body) if "fma.rn.f32" in line)
    weights = [i for i, line in enumerate(body) if "evict_first" in line and ".v4." in line]
    assert len(weights) == 8 and max(weights) < first_fma


@pytest.mark.parametrize("magnitude", [1e-12, 1e-6, 3e4, 1e9])
def test_fma_gemv_keeps_small_and_large_activations(magnitude):
    """The FMA kernel multiplies denormal nibbles by x * 2**(89 - 4j): exact (fp32 level) for
    activations far beyond those of bf16 models both ways (|x| from ~2**-66 to 2**38)."""
    torch.manual_seed(2)
    k, n = 256, 32
    qweight = pack_int32(torch.randint(0, 16, (k, n)), 0).to(DEVICE)
    scales = (torch.rand(2, n) * 0.1 + 0.01).to(DEVICE)
    zeros = torch.randint(0, 16, (2, n)).float().to(DEVICE)
    weight = dequantize_int4(qweight, scales, zeros, 128, None, torch.float32)
    x = torch.randn(2, k, device=DEVICE) * magnitude
    out = w4a16_gemv(x, qweight, scales, zeros, 128, GemvConfig(block_n=32))
    torch.testing.assert_close(out, x @ weight, rtol=1e-5, atol=1e-5 * magnitude)


def test_decode_gemv_refuses_groups_that_split_its_blocks():
    qweight = torch.zeros(16, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="divisible by 128"):
        w4a16_gemv(torch.zeros(1, 128), qweight, torch.zeros(2, 8), torch.zeros(2, 8), 64)


def test_w4a16_launcher_checks_shapes():
    qweight = torch.zeros(16, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="x has K=64 but qweight holds 128 rows"):
        w4a16_matmul(torch.zeros(1, 64), qweight, torch.zeros(4, 8), torch.zeros(4, 8), 32)


def test_per_token_quantization():
    x = torch.randn(5, 300, device=DEVICE) * 3
    x[2] = 0
    q, s = quantize_per_token_triton(x, torch.int8, 127.0, 1e-12)
    ref_q, ref_s = quantize_per_token_torch(x, torch.int8)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    q, s = quantize_per_token_triton(x, FP8, 448.0, 1e-12)
    ref_q, ref_s = quantize_per_token_torch(x, FP8)
    assert torch.equal(s, ref_s) and q.dtype == FP8
    if DEVICE == "cuda":
        assert torch.equal(q.float(), ref_q.float())
