"""Triton kernels for 4-bit weight-only matmuls (W4A16), y = x @ W with W [K, N] stored as
int4.py's layout (qweight int32 [K/8, N], scales / zeros [G, N], optional g_idx [K]).
Where groups hold whole 128-row blocks (no g_idx left after int4.py sorts act-order rows),
each packed word is loaded once:

    one row (decode)          _w4_gemv_fma_kernel: FMAs, a nibble masked in place and read as a
                              denormal float (one LOP3 + one FFMA per weight), K split over
                              programs when N alone gives too few (summed in the kernel);
                              these two in triton_w4a16_gemv.py
    rows <= GEMV_MAX_ROWS     _w4_gemv_kernel (triton_w4a16_blocks.py): eight tl.dots per
                              128-row block (or the FMA kernel per row, where TUNED says)
    rows <= GEMM_MAX_ROWS     _w4_gemm_kernel where GEMM_TUNED has a launch (one
                              [BLOCK_M, 128] x [128, BLOCK_N] dot per block), else as below
    more rows                 dequantize the layer into a scratch bf16/fp16 weight, then cuBLAS
                              (compute-bound: the dequantization is amortised over the rows)

Other layouts: the generic kernel below (split K for a few rows, a GEMM with the
dequantization fused into the K loop for more). Launches are tuned by benchmarks/w4_gpu.py.

In the generic kernel each K block of BLOCK_K rows lies in one group when there is no g_idx
and BLOCK_K divides the group size: its scales and zeros are one row; otherwise (act-order)
they are gathered per row through g_idx. Dequantization is (q - zero) * scale in fp32,
rounded once to x's dtype: the same value as the torch reference in that dtype.
The 128-row-block kernels apply the scale to the partial sums of each block instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedserve.layers.quantization.triton_split_k import num_sms, split_k, sum_splits
from pagedserve.layers.quantization.triton_w4a16_blocks import _check, _load_block, _magic_nibble
from pagedserve.layers.quantization.triton_w4a16_gemv import (GEMV_MAX_ROWS, fast_gemv_fits, gemv_config, rows_bucket,
                                                               w4a16_gemv)
from pagedserve.layers.triton_launch import launch_fitting

GEMM_MAX_ROWS = 512          # _w4_gemm_kernel, where GEMM_TUNED has the rows' bucket
GENERIC_GEMM_MAX_ROWS = 256  # act-order (g_idx) layers: the generic GEMM, dequantize + cuBLAS above


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
def _w4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, BLOCKS_PER_SPLIT, K_BLOCKS,
                    stride_xm, stride_qk, stride_sg, stride_ym, stride_ysplit,
                    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    IEEE: tl.constexpr, NUM_STAGES: tl.constexpr, SCALE_W: tl.constexpr = False):
    """x [M, K] @ W for tens to hundreds of rows: each program a [BLOCK_M, BLOCK_N] tile over
    all of K in 128-row blocks (one group each, GROUP_SIZE % 128 == 0). A block's [16,
    BLOCK_N] words are loaded once; their 8 nibbles (the LOP3 magic of _w4_gemv_kernel)
    become the [128, BLOCK_N] tile of q - zero in x's dtype (exact integers) by joins, and
    one [BLOCK_M, 128] x [128, BLOCK_N] dot per block takes x's contiguous 128 columns; the
    scale multiplies the block's sums. K may be split over programs (pid 2): each writes fp32
    partials to y [splits, M, N]. SCALE_W: the scale multiplies the weights instead ((q - zero) *
    scale in fp32, rounded once to x's dtype: the reference's own weight), so the dots chain
    through the accumulator and a block's MMA may run while the next block is dequantized."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, 128)
    m_valid = offs_m < M
    n_valid = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    b_begin = pid_k * BLOCKS_PER_SPLIT
    for b in tl.range(b_begin, tl.minimum(b_begin + BLOCKS_PER_SPLIT, K_BLOCKS), num_stages=NUM_STAGES):
        packed, scale, zero = _load_block(qw_ptr, s_ptr, z_ptr, b, offs_n, n_valid, stride_qk, stride_sg, GROUP_SIZE)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (b * 128 + offs_k)[None, :],
                    mask=m_valid[:, None], other=0.0)
        high = packed >> 16
        w_scale = scale if SCALE_W else None
        v0 = _magic_nibble(packed, 0, zero, x_ptr.dtype.element_ty, w_scale)
        v1 = _magic_nibble(packed, 1, zero, x_ptr.dtype.element_ty, w_scale)
        v2 = _magic_nibble(packed, 2, zero, x_ptr.dtype.element_ty, w_scale)
        v3 = _magic_nibble(packed, 3, zero, x_ptr.dtype.element_ty, w_scale)
        v4 = _magic_nibble(high, 0, zero, x_ptr.dtype.element_ty, w_scale)
        v5 = _magic_nibble(high, 1, zero, x_ptr.dtype.element_ty, w_scale)
        v6 = _magic_nibble(high, 2, zero, x_ptr.dtype.element_ty, w_scale)
        v7 = _magic_nibble(high, 3, zero, x_ptr.dtype.element_ty, w_scale)
        # [16, BLOCK_N, 8] with the nibble index last (i = 4 d1 + 2 d2 + d3), then rows 8r + i
        w = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
        w = tl.permute(w.reshape(16, BLOCK_N, 8), (0, 2, 1)).reshape(128, BLOCK_N)
        if SCALE_W:
            if IEEE:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
        else:
            if IEEE:
                part = tl.dot(x, w, input_precision="ieee")
            else:
                part = tl.dot(x, w)
            acc += part * scale[None, :]
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


@triton.jit
def _dequant_blocks_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, stride_qk, stride_sg, stride_wk,
                           GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """W [K, N] = (q - zero) * scale per 128-row block (one group, GROUP_SIZE % 128 == 0):
    the block's [16, BLOCK_N] words loaded once, each nibble (the LOP3 magic) stored as the 16
    rows 8r + i it holds (each row a contiguous run of BLOCK_N columns)."""
    b = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, 16)
    n_valid = offs_n < N
    packed, scale, zero = _load_block(qw_ptr, s_ptr, z_ptr, b, offs_n, n_valid, stride_qk, stride_sg, GROUP_SIZE)
    high = packed >> 16
    rows = w_ptr + (b * 128 + offs_r * 8)[:, None].to(tl.int64) * stride_wk + offs_n[None, :]
    dtype = w_ptr.dtype.element_ty
    for j in tl.static_range(4):
        tl.store(rows + j * stride_wk, _magic_nibble(packed, j, zero, dtype, scale), mask=n_valid[None, :])
        tl.store(rows + (4 + j) * stride_wk, _magic_nibble(high, j, zero, dtype, scale), mask=n_valid[None, :])


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
class GemmConfig:
    """A launch of _w4_gemm_kernel (tens to hundreds of rows; with split K, a few)."""

    block_m: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 0   # > 0: split K until about this many programs per SM
    scale_w: bool = False      # the scales multiply the weights, not each block's sums


# (rows bucket, K, N) -> _w4_gemm_kernel's launch where benchmarks/w4_gpu.py's sweep found it
# faster than the generic GEMM and dequantize + cuBLAS paths (H200, gpu/2026-12-01-h200-w4r;
# 256 and 512 rows: dequantize + cuBLAS everywhere).
GEMM_TUNED: dict[tuple[int, int, int], GemmConfig] = {
    (64, 4096, 6144): GemmConfig(64, 128, 4, 3, programs_per_sm=2),
    (64, 4096, 4096): GemmConfig(64, 128, 4, 3, programs_per_sm=2),
    (64, 4096, 28672): GemmConfig(64, 128, 4, 3, scale_w=True),
    (64, 14336, 4096): GemmConfig(64, 64, 4, 4, programs_per_sm=2, scale_w=True),
}


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, config: GemmConfig | None = None) -> torch.Tensor:
    """x [M, K] @ W through _w4_gemm_kernel (fast_gemv_fits must hold)."""
    m, k, n = _check(x, qweight, scales, zeros, group_size, None)
    if not fast_gemv_fits(k, group_size, None):
        raise ValueError(f"w4a16_gemm: needs K ({k}) and the group size ({group_size}) divisible by 128")
    config = config or GemmConfig()
    n_blocks, m_blocks = triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m)
    splits, per_split, out = split_k(x, n, k // 128, n_blocks * m_blocks, config.programs_per_sm)
    launch_fitting(
        _w4_gemm_kernel, (n_blocks, m_blocks, splits),
        x, qweight, scales, zeros, out, m, n, per_split, k // 128, x.stride(0), qweight.stride(0), scales.stride(0),
        out.stride(1), out.stride(0), GROUP_SIZE=group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        IEEE=x.dtype == torch.float32, stages=config.num_stages, stages_arg="NUM_STAGES", SCALE_W=config.scale_w,
        num_warps=config.num_warps)
    return sum_splits(out, x.dtype)


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, g_idx: torch.Tensor | None = None, path: str = "auto") -> torch.Tensor:
    """x [M, K] @ W [K, N] -> [M, N] in x's dtype. `path`: auto, gemv, gemm or dequant
    (gemv: _w4_gemv_kernel where fast_gemv_fits, else the generic kernel with split K; auto:
    GEMM_TUNED's _w4_gemm_kernel launches first)."""
    m, k, n = _check(x, qweight, scales, zeros, group_size, g_idx)
    fits = fast_gemv_fits(k, group_size, g_idx)
    if path == "auto":
        if fits and m <= GEMM_MAX_ROWS and (rows_bucket(m), k, n) in GEMM_TUNED:
            return w4a16_gemm(x, qweight, scales, zeros, group_size, GEMM_TUNED[(rows_bucket(m), k, n)])
        if fits and m <= GEMM_MAX_ROWS and gemv_config(m, k, n) is not None:
            return w4a16_gemv(x, qweight, scales, zeros, group_size)
        # the generic GEMM reloads each word per row of its block: slower than dequantize +
        # cuBLAS at 64 and 256 rows on the H200 (benchmarks/QUANT.md), kept for act-order g_idx
        path = "gemv" if m <= GEMV_MAX_ROWS else "gemm" if m <= GENERIC_GEMM_MAX_ROWS and not fits else "dequant"
    if path == "dequant":
        return x @ dequantize_w4(qweight, scales, zeros, group_size, g_idx, x.dtype)
    if path == "gemv" and fits:
        return w4a16_gemv(x, qweight, scales, zeros, group_size)
    has_g_idx = g_idx is not None
    gidx = g_idx if has_g_idx else qweight   # any pointer; unused
    ieee = x.dtype == torch.float32
    if path == "gemv":
        block_m, block_n = 16, 64
        block_k, one_group = _block_k(group_size, has_g_idx, 128)
        k_blocks = triton.cdiv(k, block_k)
        n_blocks = triton.cdiv(n, block_n)
        splits = max(1, min(k_blocks, triton.cdiv(4 * num_sms(x.device), n_blocks)))
        k_per_split = triton.cdiv(k_blocks, splits) * block_k
        splits = triton.cdiv(k, k_per_split)
    else:
        block_m, block_n = 64, 128
        block_k, one_group = _block_k(group_size, has_g_idx, 64)
        k_per_split, splits = triton.cdiv(k, block_k) * block_k, 1
    out = torch.empty((splits, m, n), dtype=torch.float32 if splits > 1 else x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)
    launch_fitting(
        _w4a16_kernel, grid,
        x, qweight, scales, zeros, gidx, out, m, n, k, k_per_split,
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(1), out.stride(0),
        GROUP_SIZE=group_size, HAS_GIDX=has_g_idx, ONE_GROUP_PER_BLOCK=one_group,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee, num_warps=4, stages=3)
    if splits > 1:
        return out.sum(0).to(x.dtype)
    return out[0]


def dequantize_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                  g_idx: torch.Tensor | None, dtype: torch.dtype, generic: bool = False) -> torch.Tensor:
    """The float weight [K, N] in `dtype`, by a Triton dequantization kernel: each packed word
    loaded once where 128-row blocks lie in one group (fast_gemv_fits), else (or `generic`,
    for comparison) per element, with g_idx."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    weight = torch.empty((k, n), dtype=dtype, device=qweight.device)
    if fast_gemv_fits(k, group_size, g_idx) and not generic:
        block_n = 256
        _dequant_blocks_kernel[(k // 128, triton.cdiv(n, block_n))](
            qweight, scales, zeros, weight, n, qweight.stride(0), scales.stride(0), weight.stride(0),
            GROUP_SIZE=group_size, BLOCK_N=block_n, num_warps=4)
        return weight
    block_k, block_n = 32, 128
    _dequant_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        qweight, scales, zeros, g_idx if g_idx is not None else qweight, weight, n, k,
        qweight.stride(0), scales.stride(0), weight.stride(0),
        GROUP_SIZE=group_size, HAS_GIDX=g_idx is not None, BLOCK_K=block_k, BLOCK_N=block_n)
    return weight
