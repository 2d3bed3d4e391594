"""The gemv's RMSNorm tail (triton_gemv.gemv_add_norm) against the plain gemv then the norm
kernel, bit for bit: normed rows and the residual updated in place, 1 / 4 / 16 rows, with and
without the SiLU-and-mul prologue; the arrival counter left zero by every launch."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from pagedserve.layers import triton_gemv  # noqa: E402
from pagedserve.layers.triton_gemv import GemvConfig, gemv, gemv_add_norm, silu_and_mul_gemv  # noqa: E402
from pagedserve.layers.triton_ops import rms_norm, zeroed_counters  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's CPU interpreter mishandles bfloat16 loads/stores: bf16 runs on the GPU machine only.
DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
CONFIG = GemvConfig(block_n=16, block_k=128, num_warps=4, num_stages=2)   # tl.dot at M > 1: block_n >= 16


def _case(m: int, n: int, k: int, dtype: torch.dtype, seed: int, silu: bool = False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * k if silu else k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(DEVICE, dtype)
    residual = torch.randn(m, n, generator=gen).to(DEVICE, dtype)
    norm_w = (1 + 0.1 * torch.randn(n, generator=gen)).to(DEVICE, dtype)
    return x, w, residual, norm_w


def _expect(y: torch.Tensor, residual: torch.Tensor, norm_w: torch.Tensor, eps: float):
    res = residual.clone()
    normed = rms_norm(y, norm_w, eps, res)
    ref_res = (y.float() + residual.float()).to(y.dtype)
    ref = (ref_res.float() * torch.rsqrt(ref_res.float().pow(2).mean(-1, keepdim=True) + eps)).to(y.dtype) * norm_w
    torch.testing.assert_close(normed.float(), ref.float(), rtol=1e-2, atol=1e-2)   # the norm kernel is right
    return normed, res


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("silu", [False, True])
def test_tail_equals_gemv_then_norm(m: int, silu: bool, dtype: torch.dtype) -> None:
    n, k = 1024, 256   # the norm kernel's 4 warps at hidden 1024: the tail's launch shape
    x, w, residual, norm_w = _case(m, n, k, dtype, seed=m + 100 * silu, silu=silu)
    y = silu_and_mul_gemv(x, w, CONFIG) if silu else gemv(x, w, CONFIG)
    exp_normed, exp_res = _expect(y, residual, norm_w, 1e-5)
    before = residual.data_ptr()
    out = gemv_add_norm(x, w, residual, norm_w, 1e-5, silu=silu, config=CONFIG)
    assert out is not None
    normed, res = out
    assert res.data_ptr() == before   # in place
    assert torch.equal(res, exp_res) and torch.equal(normed, exp_normed)
    assert int(zeroed_counters(x.device, 1)[0]) == 0   # left clean for the next launch


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_launches_in_a_row(dtype: torch.dtype) -> None:
    """The second launch's counter starts from zero: its last program (and only it) normalises."""
    n, k = 1024, 128
    x, w, residual, norm_w = _case(2, n, k, dtype, seed=5)
    x2, w2, _, norm_w2 = _case(2, n, k, dtype, seed=6)
    normed, res = gemv_add_norm(x, w, residual.clone(), norm_w, 1e-6, config=CONFIG)
    normed2, res2 = gemv_add_norm(x2, w2, res, norm_w2, 1e-6, config=CONFIG)
    exp_normed, exp_res = _expect(gemv(x, w, CONFIG), residual, norm_w, 1e-6)
    exp_normed2, exp_res2 = _expect(gemv(x2, w2, CONFIG), exp_res, norm_w2, 1e-6)
    assert torch.equal(normed, exp_normed) and torch.equal(normed2, exp_normed2) and torch.equal(res2, exp_res2)
    assert int(zeroed_counters(x.device, 1)[0]) == 0


def test_declines_what_it_cannot_fuse() -> None:
    """None (the caller launches the norm): off, a hidden size whose norm launch has other warps,
    mismatched residual or weights."""
    x, w, residual, norm_w = _case(1, 1024, 128, torch.float16, seed=1)
    assert gemv_add_norm(x, w, residual, norm_w.float(), 1e-5, config=CONFIG) is None
    assert gemv_add_norm(x, w, residual[:, :512], norm_w, 1e-5, config=CONFIG) is None
    small = _case(1, 256, 128, torch.float16, seed=2)   # the norm kernel runs 1 warp at 256
    assert gemv_add_norm(*small, 1e-5, config=CONFIG) is None
    triton_gemv.set_norm_tail(False)
    try:
        assert gemv_add_norm(x, w, residual, norm_w, 1e-5, config=CONFIG) is None
    finally:
        triton_gemv.set_norm_tail(True)


_COMPILE_FOR_SM90 = """
import re
from pagedserve.layers.triton_gemv import _gemv_kernel
from pagedserve.layers.triton_ops import _rms_norm_kernel, rms_norm_warps

def reduce_layout(ttgir, h):
    # the layout the row's sum of squares is reduced in: the reduction tree follows it
    alias = re.search(r"\\(tensor<%dxf32, (#[a-z0-9]+)>\\) -> f32" % h, ttgir).group(1)
    return re.search(r"^%s = (.*)$" % alias, ttgir, re.M).group(1)

for block_h in (2048, 4096):
    norm = build(_rms_norm_kernel, dict(HAS_RESIDUAL=True, BLOCK=block_h), {},
                 divisible=("x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "x_stride", "res_stride", "out_stride",
                            "n_cols"), num_warps=rms_norm_warps(block_h))
    for prologue, block_m, block_n, block_k in [(0, 1, 4, 512), (1, 1, 8, 1024), (1, 1, 16, 512), (0, 16, 32, 512)]:
        c = build(_gemv_kernel, dict(PROLOGUE=prologue, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                     EVEN_K=True, NUM_STAGES=3, LIBDEVICE=True, NORM_TAIL=True, BLOCK_H=block_h),
                  {"counter_ptr": "*i32", "inv_n": "fp32", "eps": "fp32"},
                  divisible=("x_ptr", "w_ptr", "y_ptr", "res_ptr", "norm_w_ptr", "normed_ptr", "K", "N",
                             "stride_xm", "stride_wn", "stride_ym", "stride_rm", "stride_om"), num_warps=4)
        ptx = c.asm["ptx"]
        assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx and "atom.global.gpu.relaxed.exch" in ptx
        assert reduce_layout(c.asm["ttgir"], block_h) == reduce_layout(norm.asm["ttgir"], block_h), block_h
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU tests compile these kernels for the device itself")
def test_tail_compiles_for_sm90() -> None:
    """The tail's launch shapes to cubins for sm_90 (tests/kernels/sm90_compile.py): the ticket an
    acq_rel atomic, the finished rows read past the L1, the counter reset; the row's sum of
    squares reduced in the norm kernel's layout (the same tree: the same bits)."""
    pytest.importorskip("triton.backends.nvidia")
    from tests.kernels.sm90_compile import run
    proc = run(_COMPILE_FOR_SM90)
    assert proc.returncode == 0, proc.stderr[-3000:]
