"""Triton kernels for 4-bit weight-only matmuls (W4A16), y = x @ W with W [K, N] stored as
int4.py's layout (qweight int32 [K/8, N], scales / zeros [G, N], optional g_idx [K]).

    rows <= GEMV_MAX_ROWS     split-K GEMV: programs over (N blocks, K splits), fp32 partials
                              summed after; decode is bound by reading the 4-bit weights
    rows <= GEMM_MAX_ROWS     GEMM with the dequantization fused into the K loop
    more rows                 dequantize the layer into a scratch bf16/fp16 weight, then cuBLAS
                              (compute-bound: the dequantization is amortised over the rows)

Each K block of BLOCK_K rows lies in one group when there is no g_idx and BLOCK_K divides
the group size: its scales and zeros are one row; otherwise (act-order) they are gathered per
row through g_idx. Dequantization is (q - zero) * scale in fp32, rounded once to x's dtype:
the same value as the torch reference in that dtype.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

GEMV_MAX_ROWS = 16
GEMM_MAX_ROWS = 256
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                  stride_xm, stride_qk, stride_sg, stride_ym, stride_ysplit,
                  GROUP_SIZE: tl.constexpr, HAS_GIDX: tl.constexpr, ONE_GROUP_PER_BLOCK: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_valid = offs_m < M
    n_valid = offs_n < N
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        rows = k + offs_k
        k_valid = rows < k_end
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + rows[None, :],
                    mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        packed = tl.load(qw_ptr + (rows // 8)[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                         mask=k_valid[:, None] & n_valid[None, :], other=0)
        q = ((packed >> ((rows % 8) * 4)[:, None]) & 0xF).to(tl.float32)
        if HAS_GIDX:
            groups = tl.load(g_ptr + rows, mask=k_valid, other=0)
            where = groups[:, None].to(tl.int64) * stride_sg + offs_n[None, :]
            gmask = k_valid[:, None] & n_valid[None, :]
            scale = tl.load(s_ptr + where, mask=gmask, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + where, mask=gmask, other=0.0).to(tl.float32)
            w = (q - zero) * scale
        elif ONE_GROUP_PER_BLOCK:
            group = k // GROUP_SIZE
            scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=n_valid, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + group * stride_sg + offs_n, mask=n_valid, other=0.0).to(tl.float32)
            w = (q - zero[None, :]) * scale[None, :]
        else:
            where = (rows // GROUP_SIZE)[:, None].to(tl.int64) * stride_sg + offs_n[None, :]
            gmask = k_valid[:, None] & n_valid[None, :]
            scale = tl.load(s_ptr + where, mask=gmask, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + where, mask=gmask, other=0.0).to(tl.float32)
            w = (q - zero) * scale
        if IEEE:
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    out = y_ptr + pid_k * stride_ysplit + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, g_ptr, w_ptr, N, K, stride_qk, stride_sg, stride_wk,
                    GROUP_SIZE: tl.constexpr, HAS_GIDX: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < K)[:, None] & (cols < N)[None, :]
    packed = tl.load(qw_ptr + (rows // 8)[:, None].to(tl.int64) * stride_qk + cols[None, :], mask=mask, other=0)
    q = ((packed >> ((rows % 8) * 4)[:, None]) & 0xF).to(tl.float32)
    if HAS_GIDX:
        groups = tl.load(g_ptr + rows, mask=rows < K, other=0)
    else:
        groups = rows // GROUP_SIZE
    where = groups[:, None].to(tl.int64) * stride_sg + cols[None, :]
    scale = tl.load(s_ptr + where, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + where, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr + rows[:, None].to(tl.int64) * stride_wk + cols[None, :],
             ((q - zero) * scale).to(w_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
           g_idx: torch.Tensor | None) -> tuple[int, int, int]:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"w4a16: x must be [M, K] with unit column stride; got {tuple(x.shape)} {x.stride()}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or not qweight.is_contiguous():
        raise ValueError(f"w4a16: qweight must be a contiguous int32 [K/8, N]; got {qweight.dtype} {tuple(qweight.shape)}")
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * 8 != k:
        raise ValueError(f"w4a16: x has K={k} but qweight holds {qweight.shape[0] * 8} rows")
    if x.dtype not in _DTYPES or scales.dtype != x.dtype or zeros.dtype != x.dtype:
        raise ValueError(f"w4a16: x, scales and zeros must share a dtype in {_DTYPES}; got {x.dtype}, "
                         f"{scales.dtype}, {zeros.dtype}")
    groups = -(-k // group_size)
    if g_idx is None and (scales.shape != (groups, n) or zeros.shape != (groups, n)):
        raise ValueError(f"w4a16: scales and zeros must be [{groups}, {n}]; got {tuple(scales.shape)}, "
                         f"{tuple(zeros.shape)}")
    if g_idx is not None and (g_idx.shape != (k,) or g_idx.dtype != torch.int32 or scales.shape[1] != n):
        raise ValueError(f"w4a16: g_idx must be int32 [{k}]; got {g_idx.dtype} {tuple(g_idx.shape)}")
    if not (scales.is_contiguous() and zeros.is_contiguous() and scales.stride() == zeros.stride()):
        raise ValueError("w4a16: scales and zeros must be contiguous")
    return m, k, n


def _block_k(group_size: int, has_g_idx: bool, preferred: int) -> tuple[int, bool]:
    """BLOCK_K and whether each K block lies in one group (scales loaded as one row)."""
    if not has_g_idx and group_size % 16 == 0:
        block = min(preferred, group_size)
        while group_size % block:
            block //= 2
        if block >= 16:
            return block, True
    return preferred, False


@dataclass(frozen=True)
class GemvConfig:
    """The split-K GEMV's launch: tile sizes, warps, pipeline stages and how many programs
    per SM the K split aims for (benchmarks/quant_gpu.py sweep times alternatives)."""

    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 4


DEFAULT_GEMV = GemvConfig()


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, g_idx: torch.Tensor | None = None, path: str = "auto",
                 gemv: GemvConfig = DEFAULT_GEMV) -> torch.Tensor:
    """x [M, K] @ W [K, N] -> [M, N] in x's dtype. `path`: auto, gemv, gemm or dequant."""
    m, k, n = _check(x, qweight, scales, zeros, group_size, g_idx)
    if path == "auto":
        path = "gemv" if m <= GEMV_MAX_ROWS else "gemm" if m <= GEMM_MAX_ROWS else "dequant"
    if path == "dequant":
        return x @ dequantize_w4(qweight, scales, zeros, group_size, g_idx, x.dtype)
    has_g_idx = g_idx is not None
    gidx = g_idx if has_g_idx else qweight   # any pointer; unused
    ieee = x.dtype == torch.float32
    if path == "gemv":
        block_m, block_n = 16, gemv.block_n
        block_k, one_group = _block_k(group_size, has_g_idx, gemv.block_k)
        k_blocks = triton.cdiv(k, block_k)
        n_blocks = triton.cdiv(n, block_n)
        target = gemv.programs_per_sm * _num_sms(x.device)
        splits = max(1, min(k_blocks, triton.cdiv(target, n_blocks * triton.cdiv(m, block_m))))
        k_per_split = triton.cdiv(k_blocks, splits) * block_k
        splits = triton.cdiv(k, k_per_split)
        out = torch.empty((splits, m, n), dtype=torch.float32 if splits > 1 else x.dtype, device=x.device)
        grid = (triton.cdiv(m, block_m), n_blocks, splits)
        warps, stages = gemv.num_warps, gemv.num_stages
    else:
        block_m, block_n = 64, 128
        block_k, one_group = _block_k(group_size, has_g_idx, 64)
        k_per_split, splits = triton.cdiv(k, block_k) * block_k, 1
        out = torch.empty((1, m, n), dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), 1)
        warps, stages = 4, 3
    _w4a16_kernel[grid](
        x, qweight, scales, zeros, gidx, out, m, n, k, k_per_split,
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(1), out.stride(0),
        GROUP_SIZE=group_size, HAS_GIDX=has_g_idx, ONE_GROUP_PER_BLOCK=one_group,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee, num_warps=warps, num_stages=stages)
    if splits > 1:
        return out.sum(0).to(x.dtype)
    return out[0]


def dequantize_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                  g_idx: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The float weight [K, N] in `dtype`, by the Triton dequantization kernel."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    weight = torch.empty((k, n), dtype=dtype, device=qweight.device)
    block_k, block_n = 32, 128
    _dequant_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        qweight, scales, zeros, g_idx if g_idx is not None else qweight, weight, n, k,
        qweight.stride(0), scales.stride(0), weight.stride(0),
        GROUP_SIZE=group_size, HAS_GIDX=g_idx is not None, BLOCK_K=block_k, BLOCK_N=block_n)
    return weight
