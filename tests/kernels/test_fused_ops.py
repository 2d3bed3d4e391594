"""Fused Triton elementwise kernels against the torch layers (CPU: Triton's interpreter)."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from pagedserve.layers.rotary import RotaryEmbedding  # noqa: E402
from pagedserve.layers.triton_ops import embed_row, rms_norm, rotary_in_place, silu_and_mul  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def ref_rms(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 576), (33, 1000)])
def test_rms_norm(dtype, rows, hidden):
    g = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=g).to(DEVICE, dtype)
    res = torch.randn(rows, hidden, generator=g).to(DEVICE, dtype)
    w = torch.randn(hidden, generator=g).to(DEVICE, dtype)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), ref_rms(x, w, 1e-5), atol=TOL[dtype], rtol=TOL[dtype])
    expected_res = x + res
    out = rms_norm(x, w, 1e-5, res)
    torch.testing.assert_close(res, expected_res, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(out, ref_rms(expected_res, w, 1e-5), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 128), (5, 1536), (9, 1100)])
def test_silu_and_mul(dtype, rows, d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(rows, 2 * d, generator=g).to(DEVICE, dtype)
    expected = torch.nn.functional.silu(x[:, :d]) * x[:, d:]
    if DEVICE == "cuda":   # same rounding points as torch's silu and mul: bit for bit
        assert torch.equal(silu_and_mul(x), expected)
    torch.testing.assert_close(silu_and_mul(x), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (9, 3, 64), (8, 8, 128)])
def test_rotary_in_place_on_qkv_views(dtype, heads, kv_heads, head_dim):
    rope = RotaryEmbedding(head_dim, 256, 10000.0, dtype=dtype).to(DEVICE)
    g = torch.Generator().manual_seed(heads)
    tokens = 11
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(DEVICE, dtype)
    positions = torch.randint(0, 256, (tokens,), generator=g).to(DEVICE)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.reshape(tokens, heads, head_dim), k.reshape(tokens, kv_heads, head_dim)
    cos, sin = rope.cos_cache[positions].unsqueeze(1), rope.sin_cache[positions].unsqueeze(1)
    exp_q = q * cos + rope._rotate_half(q) * sin
    exp_k = k * cos + rope._rotate_half(k) * sin
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    rotary_in_place(positions, q, k, rope.cos_cache, rope.sin_cache)
    if dtype != torch.float32:   # transformers' three roundings in the input dtype: bit for bit
        assert torch.equal(q, exp_q) and torch.equal(k, exp_k)
    torch.testing.assert_close(q, exp_q, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(k, exp_k, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)   # V untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden,num_sums", [(64, 5), (576, 61), (1000, 1)])
def test_embed_row_sets_the_norm_chain_sums(dtype, hidden, num_sums):
    """The norm chain's first launch: the token's row (ids out of range clamped into the vocabulary),
    its fp64 sum of squares in sums[0] exactly as the norm kernel sums it, every other sum zeroed."""
    g = torch.Generator().manual_seed(hidden)
    weight = torch.randn(50, hidden, generator=g).to(DEVICE, dtype)
    for token, row in ((7, 7), (49, 49), (-3, 0), (50, 49)):
        sums = torch.full((num_sums,), 3.5, dtype=torch.float64, device=DEVICE)
        out = embed_row(torch.tensor([token], device=DEVICE), weight, sums)
        assert out.shape == (1, hidden) and out.dtype == dtype and torch.equal(out[0], weight[row])
        expected = torch.zeros(num_sums, dtype=torch.float64)
        expected[0] = weight[row].double().square().sum().item()
        assert torch.equal(sums.cpu(), expected), (token, sums[:3])
    sums = torch.zeros(num_sums, dtype=torch.float64, device=DEVICE)
    assert torch.equal(embed_row(torch.tensor([3], dtype=torch.int32, device=DEVICE), weight, sums)[0], weight[3])
    with pytest.raises(ValueError, match="embed_row"):
        embed_row(torch.tensor([1, 2], device=DEVICE), weight, sums)
    with pytest.raises(ValueError, match="embed_row"):
        embed_row(torch.tensor([1], device=DEVICE), weight, sums.float())


def test_launchers_reject_bad_shapes():
    with pytest.raises(ValueError, match="rms_norm"):
        rms_norm(torch.zeros(2, 3, 4, device=DEVICE), torch.ones(4, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="silu_and_mul"):
        silu_and_mul(torch.zeros(2, 5, device=DEVICE))


_NORM_PTX = """
import json
from tests.kernels.sm90_compile import build
from pagedserve.layers.triton_ops import _rms_norm_kernel
k = build(_rms_norm_kernel, dict(HAS_RESIDUAL=True, BLOCK=4096),
          {"n_cols": "i32", "inv_n": "fp32", "eps": "fp32", "x_stride": "i32", "res_stride": "i32", "out_stride": "i32"},
          ("x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "n_cols", "x_stride", "res_stride", "out_stride"),
          num_warps=8)
ops = [op for line in k.asm["ptx"].splitlines() for op in ("ld.global", "shfl.sync", "bar.sync") if op in line]
print(json.dumps(ops))
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="compiles for sm_90 on a machine without a GPU")
def test_rms_norm_issues_every_load_before_the_sum() -> None:
    """llama-8b's hidden size on 8 warps, as the decode graphs launch it: the weight's load goes out with
    the row's and the residual's, before the reduction's shuffles and barrier (loaded after the sum, it
    was one more round trip a norm: 2.15 -> 1.75 us on the H200, benchmarks/RESULTS.md session 22)."""
    pytest.importorskip("triton.backends.nvidia")
    import json
    from tests.kernels.sm90_compile import run
    proc = run(_NORM_PTX)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ops = json.loads(proc.stdout.strip().splitlines()[-1])
    first_sum = min(i for i, op in enumerate(ops) if op != "ld.global")
    assert ops.count("ld.global") == 6 and ops[:first_sum] == ["ld.global"] * 6, ops


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rotary_tables_build_under_another_default_device(scaling):
    """The model is built under its device as the default (CUDA on a GPU): the frequencies are
    computed on the CPU (as transformers does) and only the tables move. YaRN's ramp once took
    the default device and failed to build any YaRN model on a GPU (the meta device stands in
    for CUDA here: it checks devices, not values)."""
    cpu = RotaryEmbedding(64, 128, 10000.0, scaling)
    with torch.device("meta"):
        meta = RotaryEmbedding(64, 128, 10000.0, scaling)
    assert meta.cos_cache.device.type == "meta" and meta.cos_cache.shape == cpu.cos_cache.shape
