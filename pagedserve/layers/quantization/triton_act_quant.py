"""Per-token dynamic quantization in one launch: one program per row finds the row's absmax
(pass 1) and writes the quantized row (pass 2); scale = max(absmax / qmax, 1e-12), values
x / scale rounded half to even (int8) or saturated to +-448 (fp8 e4m3), as act_quant.py's
torch reference."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn


@triton.jit
def _per_token_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, QMAX: tl.constexpr, MIN_S: tl.constexpr,
                      IS_INT8: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_x + k + offs, mask=k + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / QMAX, MIN_S)
    tl.store(s_ptr + row, scale)
    for k in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_x + k + offs, mask=k + offs < K, other=0.0).to(tl.float32)
        y = tl.math.div_rn(x, scale)   # IEEE division, as torch's
        if IS_INT8:   # round half to even, as torch.round
            r = tl.floor(y + 0.5)
            odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
            r = tl.where(((r - y) == 0.5) & odd, r - 1.0, r)
            y = tl.minimum(tl.maximum(r, -128.0), 127.0)
        else:
            y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        tl.store(q_ptr + row * stride_q + k + offs, y.to(q_ptr.dtype.element_ty), mask=k + offs < K)


def quantize_per_token_triton(x: torch.Tensor, dtype: torch.dtype, qmax: float,
                              min_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (unit column stride, CUDA) -> (xq [M, K] int8 or fp8, scale [M, 1] fp32):
    scale = max(absmax / qmax, min_scale)."""
    if x.dim() != 2 or x.stride(1) != 1 or dtype not in (torch.int8, FP8):
        raise ValueError(f"per-token quantization: x [M, K] with unit column stride to int8 or fp8; got "
                         f"{tuple(x.shape)} {x.stride()} -> {dtype}")
    m, k = x.shape
    xq = torch.empty((m, k), dtype=dtype, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _per_token_kernel[(m,)](x, xq, scale, k, x.stride(0), xq.stride(0), QMAX=qmax, MIN_S=min_scale,
                                IS_INT8=dtype == torch.int8, BLOCK=min(2048, triton.next_power_of_2(k)),
                                num_warps=4)
    return xq, scale
