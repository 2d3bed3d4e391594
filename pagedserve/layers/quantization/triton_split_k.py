"""Split K for the decode-sized GEMV kernels (triton_w4a16_gemv, triton_w4a16, triton_gguf): how
many programs share a row's K, and the fp32 partials summed once into the output's dtype when a
kernel does not sum its splits itself."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _sum_splits_kernel(p_ptr, y_ptr, SPLITS, SIZE, BLOCK: tl.constexpr):
    """y = sum over the split axis of fp32 partials [SPLITS, SIZE], rounded once to y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < SIZE
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(p_ptr + s * SIZE + offs, mask=valid, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=valid)


@functools.lru_cache(maxsize=8)
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(device: torch.device, k_blocks: int, tiles: int, programs_per_sm: int) -> tuple[int, int]:
    """(splits, K blocks per split) for `tiles` (M, N) tiles aiming at programs_per_sm programs per SM."""
    splits = max(1, min(k_blocks, triton.cdiv(programs_per_sm * num_sms(device), tiles)))
    per_split = triton.cdiv(k_blocks, splits)
    return triton.cdiv(k_blocks, per_split), per_split


def split_k(x: torch.Tensor, n: int, k_blocks: int, tiles: int, programs_per_sm: int,
            dtype: torch.dtype | None = None) -> tuple[int, int, torch.Tensor]:
    """split_count's (splits, K blocks per split), and the output [splits, M, N]: fp32 partials when
    split, else the output itself in `dtype` (x's by default)."""
    splits, per_split = split_count(x.device, k_blocks, tiles, programs_per_sm)
    out = torch.empty((splits, x.shape[0], n), dtype=torch.float32 if splits > 1 else dtype or x.dtype,
                      device=x.device)
    return splits, per_split, out


def sum_splits(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if partials.shape[0] == 1:
        return partials[0]
    _, m, n = partials.shape
    y = torch.empty((m, n), dtype=dtype, device=partials.device)
    _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](partials, y, partials.shape[0], m * n, BLOCK=1024)
    return y
