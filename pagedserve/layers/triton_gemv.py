"""Triton matmul for decode-sized batches: y = x @ w.T for x [M, K] with few rows (M <= 16)
and an nn.Linear weight w [N, K], bf16 / fp16, on CUDA.

At batch 1-16 a decode step's matmuls are bound by reading the weights: every byte of w is
read once and the arithmetic is nil. Each program streams a [BLOCK_N, BLOCK_K] slab of w
over the whole of K through a software pipeline (NUM_STAGES loads in flight, as tl.dot lets
Triton pipeline them) against the padded [16, BLOCK_K] rows of x; the accumulator is fp32,
the output is rounded once.

One launch shape serves every weight: `benchmarks/gemv_sweep.py` searched block_n 16-128,
block_k 128-512, split K 1-8, 4/8 warps and 3-6 stages on an H100 (benchmarks/gpu/
2026-11-24-h100-gemv.json); 32 x 512, 4 warps, 4 stages, no split is the best or within 2% of
it on the weights of >= 32 MiB, where it beats cuBLAS by 3-14% (HBM 2.8-3.1 TB/s). Smaller
weights (llama-1b's qkv and o) stay with cuBLAS, which is as fast there. One shape is also one
compiled kernel: a cold start pays a single Triton compile for it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 16
MIN_WEIGHT_BYTES = 32 * 2**20
_DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    m_valid = offs_m[:, None] < M
    n_valid = offs_n[:, None] < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        cols = k + offs_k
        if EVEN_K:
            x = tl.load(x_rows + cols[None, :], mask=m_valid, other=0.0)
            w = tl.load(w_rows + cols[None, :], mask=n_valid, other=0.0)
        else:
            x = tl.load(x_rows + cols[None, :], mask=m_valid & (cols[None, :] < K), other=0.0)
            w = tl.load(w_rows + cols[None, :], mask=n_valid & (cols[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    out = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_valid & (offs_n[None, :] < N))


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 32
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 4


DEFAULT_CONFIG = GemvConfig()


def use_gemv(x: torch.Tensor, weight: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """Whether gemv beats cuBLAS here: CUDA, bf16/fp16, 1 to min(max_rows, MAX_ROWS) rows (a
    step that samples no row computes logits of 0 rows), a weight of at least
    MIN_WEIGHT_BYTES, unit column strides."""
    return (x.dim() == 2 and 0 < x.shape[0] <= min(max_rows, MAX_ROWS) and x.is_cuda and x.dtype in _DTYPES
            and weight.dtype == x.dtype and weight.numel() * weight.element_size() >= MIN_WEIGHT_BYTES
            and x.stride(1) == 1 and weight.stride(1) == 1)


def gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS, unit column stride) @ weight.T ([N, K], unit column stride)
    -> [M, N] in x's dtype. Mutates nothing."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv: x must be [M, K] and weight [N, K]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    if not 0 < x.shape[0] <= MAX_ROWS:
        raise ValueError(f"gemv: x has {x.shape[0]} rows; this kernel takes 1..{MAX_ROWS}")
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"gemv: x and weight must share one dtype in {_DTYPES}; got {x.dtype}, {weight.dtype}")
    if x.stride(1) != 1 or weight.stride(1) != 1 or x.device != weight.device:
        raise ValueError(f"gemv: x and weight need unit column strides on one device; got strides "
                         f"{x.stride()} and {weight.stride()}")
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=16, BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=k % config.block_k == 0,
        NUM_STAGES=config.num_stages, num_warps=config.num_warps)
    return y
