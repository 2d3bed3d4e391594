"""Activation quantization for W8A8 (int8) and FP8 layers: per-token dynamic (one scale per
row: absmax / qmax), per-tensor static (the checkpoint's input_scale) and per-group dynamic
(rows split in groups of K, FP8 block checkpoints). A Triton kernel does per-token
quantization in one launch on CUDA; CPU uses the torch version (the reference the kernel is
tested against)."""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max   # 448
INT8_MAX = 127.0
MIN_SCALE = 1e-12   # an all-zero row gets a tiny scale, not a division by zero


def qmax(dtype: torch.dtype) -> float:
    return INT8_MAX if dtype == torch.int8 else FP8_MAX


def cast_quantized(scaled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values already divided by their scale -> int8 (rounded half to even) or fp8 (saturated)."""
    if dtype == torch.int8:
        return scaled.round().clamp(-128, 127).to(torch.int8)
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(dtype)


def quantize_per_token_torch(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] of `dtype`, scale [M, 1] fp32) with x ~= xq * scale."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / qmax(dtype)).clamp(min=MIN_SCALE)
    return cast_quantized(x / scale, dtype), scale


def quantize_per_group_torch(x: torch.Tensor, dtype: torch.dtype, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K], scale [M, ceil(K / group)] fp32), one scale per row and group."""
    m, k = x.shape
    groups = -(-k // group)
    padded = torch.nn.functional.pad(x.float(), (0, groups * group - k)).view(m, groups, group)
    scale = (padded.abs().amax(dim=-1, keepdim=True) / qmax(dtype)).clamp(min=MIN_SCALE)
    xq = cast_quantized(padded / scale, dtype).view(m, groups * group)[:, :k]
    return xq, scale.view(m, groups)


def quantize_static(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return cast_quantized(x.float() / scale, dtype)


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda and x.dim() == 2 and x.stride(1) == 1 and x.shape[0] > 0:
        from pagedserve.layers.quantization.triton_act_quant import quantize_per_token_triton
        return quantize_per_token_triton(x, dtype, qmax(dtype), MIN_SCALE)
    return quantize_per_token_torch(x, dtype)
