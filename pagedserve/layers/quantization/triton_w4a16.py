"""Triton kernels for 4-bit weight-only matmuls (W4A16), y = x @ W with W [K, N] stored as
int4.py's layout (qweight int32 [K/8, N], scales / zeros [G, N], optional g_idx [K]).

    rows <= GEMV_MAX_ROWS     _w4_gemv_kernel where groups hold whole 128-row blocks (no g_idx
                              left after int4.py sorts act-order rows): each packed word is
                              loaded once, FMAs for one row or tl.dot for up to 16, K split
                              over programs when N alone gives too few; decode is bound by
                              reading the 4-bit weights. Other layouts: the generic kernel
                              below with split K.
    rows <= GEMM_MAX_ROWS     the generic kernel as a GEMM with the dequantization fused into
                              the K loop (or _w4_gemv_kernel's tl.dot launch where the sweep of
                              benchmarks/w4_gpu.py found it faster: TUNED)
    more rows                 dequantize the layer into a scratch bf16/fp16 weight, then cuBLAS
                              (compute-bound: the dequantization is amortised over the rows)

In the generic kernel each K block of BLOCK_K rows lies in one group when there is no g_idx
and BLOCK_K divides the group size: its scales and zeros are one row; otherwise (act-order)
they are gathered per row through g_idx. Dequantization is (q - zero) * scale in fp32,
rounded once to x's dtype: the same value as the torch reference in that dtype.
_w4_gemv_kernel applies the scale to the partial sums of each block instead (see there).
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
def _w4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, BLOCKS_PER_SPLIT, K_BLOCKS,
                    stride_xm, stride_qk, stride_sg, stride_ym, stride_ysplit,
                    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    USE_DOT: tl.constexpr, IEEE: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Decode-sized x [M, K] @ W: programs over (N blocks, K splits, M blocks); each K block
    is 128 rows = 16 packed int32 rows of W inside one group (GROUP_SIZE % 128 == 0), loaded
    once as [16, BLOCK_N] words. Nibble i of word r is row 8r + i: its values meet x's rows
    8r + i. A nibble becomes a float without shifts or int->float conversions: nibble j of a
    16-bit half, masked in place (q << 4j) and or-ed with the exponent of 2**(23 - 4j), reads
    as the fp32 2**(23 - 4j) + q exactly, so q - zero is one subtraction (zero points are
    integers 0..15). The scale multiplies the block's partial sums once per word.
    USE_DOT=False: one row of x per program (BLOCK_M 1), fp32 FMAs into a [16, BLOCK_N]
    accumulator summed at the end.
    USE_DOT=True: eight [BLOCK_M, 16] x [16, BLOCK_N] dots per block on the exact integers
    q - zero in x's dtype (BLOCK_M >= 16; also a GEMM for a few hundred rows)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, 16)
    n_valid = offs_n < N
    b_begin = pid_k * BLOCKS_PER_SPLIT
    b_end = tl.minimum(b_begin + BLOCKS_PER_SPLIT, K_BLOCKS)
    if USE_DOT:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for b in tl.range(b_begin, b_end, num_stages=NUM_STAGES):
        packed = tl.load(qw_ptr + (b * 16 + offs_r)[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                         mask=n_valid[None, :], other=0)
        group = (b * 128) // GROUP_SIZE
        scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=n_valid, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + group * stride_sg + offs_n, mask=n_valid, other=0.0).to(tl.float32)
        high = packed >> 16
        if USE_DOT:
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        else:
            part = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(4):
            zc = zero + 8388608.0 / 16.0 ** j   # the magic's own value, 2**(23 - 4j), plus the zero
            for h in tl.static_range(2):
                if h == 0:
                    word = packed
                else:
                    word = high
                nib = ((word & (15 << (4 * j))) | (0x4B000000 - j * 0x02000000)).to(tl.float32, bitcast=True)
                nib = nib - zc[None, :]
                cols = b * 128 + offs_r * 8 + 4 * h + j
                if USE_DOT:
                    xs = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + cols[None, :],
                                 mask=m_valid[:, None], other=0.0)
                    w = nib.to(x_ptr.dtype.element_ty)
                    if IEEE:
                        part = tl.dot(xs, w, part, input_precision="ieee")
                    else:
                        part = tl.dot(xs, w, part)
                else:
                    xs = tl.load(x_ptr + pid_m.to(tl.int64) * stride_xm + cols).to(tl.float32)
                    part += nib * xs[:, None]
        acc += part * scale[None, :]
    if USE_DOT:
        out = y_ptr + pid_k * stride_ysplit + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])
    else:
        tl.store(y_ptr + pid_k * stride_ysplit + pid_m.to(tl.int64) * stride_ym + offs_n, tl.sum(acc, 0).to(y_ptr.dtype.element_ty), mask=n_valid)


@triton.jit
def _sum_splits_kernel(p_ptr, y_ptr, SPLITS, SIZE, BLOCK: tl.constexpr):
    """y = sum over the split axis of fp32 partials [SPLITS, SIZE], rounded once to y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < SIZE
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(p_ptr + s * SIZE + offs, mask=valid, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=valid)


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
    """A decode-sized launch of _w4_gemv_kernel: BLOCK_N, warps, pipeline stages, how many
    programs per SM the K split aims for (split K only when N alone gives too few), and FMA
    (one row per program) or tl.dot (16 rows per program). benchmarks/w4_gpu.py sweeps them."""

    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 4   # 0: never split K
    dot: bool = False
    block_m: int = 16   # rows per program of the tl.dot launch (>= 16)


FMA_GEMV = GemvConfig(block_n=64, programs_per_sm=8)   # the sweep's most frequent winners
DOT_GEMV = GemvConfig(block_n=128, dot=True)
# (rows bucket, K, N) -> the measured best launch: benchmarks/w4_gpu.py's sweep on an H200,
# 2026-11-30 (llama-8b's qkv / o / gate_up / down, bf16, group 128; benchmarks/QUANT.md).
# Buckets of more than GEMV_MAX_ROWS rows are used only where the sweep found this kernel
# faster than the GEMM / dequantize paths (there it did not).
TUNED: dict[tuple[int, int, int], GemvConfig] = {
    (1, 4096, 6144): GemvConfig(block_n=64, programs_per_sm=8),
    (1, 4096, 4096): GemvConfig(block_n=128, programs_per_sm=2),
    (1, 4096, 28672): GemvConfig(block_n=64, programs_per_sm=8),
    (1, 14336, 4096): GemvConfig(block_n=64, programs_per_sm=8),
    (4, 4096, 6144): GemvConfig(block_n=128, dot=True),
    (4, 4096, 4096): GemvConfig(block_n=64, dot=True),
    (4, 4096, 28672): GemvConfig(block_n=128, num_warps=8, dot=True),
    (4, 14336, 4096): GemvConfig(block_n=128, dot=True),
    (16, 4096, 6144): GemvConfig(block_n=128, dot=True),
    (16, 4096, 4096): GemvConfig(block_n=128, dot=True),
    (16, 4096, 28672): GemvConfig(block_n=128, num_warps=8, dot=True),
    (16, 14336, 4096): GemvConfig(block_n=128, dot=True),
}


def rows_bucket(m: int) -> int:
    return next(b for b in (1, 4, 16, 64, 256) if m <= b) if m <= 256 else m


def gemv_config(m: int, k: int, n: int) -> GemvConfig | None:
    default = None if m > GEMV_MAX_ROWS else FMA_GEMV if m == 1 else DOT_GEMV
    return TUNED.get((rows_bucket(m), k, n), default)


def fast_gemv_fits(k: int, group_size: int, g_idx: torch.Tensor | None) -> bool:
    """_w4_gemv_kernel's 128-row K blocks each lie in one group: no act-order gather left."""
    return g_idx is None and group_size % 128 == 0 and k % 128 == 0


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, config: GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] (decode-sized) @ W through _w4_gemv_kernel (fast_gemv_fits must hold);
    with split K the fp32 partials are summed by one more small kernel."""
    m, k, n = _check(x, qweight, scales, zeros, group_size, None)
    if not fast_gemv_fits(k, group_size, None):
        raise ValueError(f"w4a16_gemv: needs K ({k}) and the group size ({group_size}) divisible by 128")
    config = config or gemv_config(m, k, n) or DOT_GEMV
    block_m = config.block_m if config.dot else 1
    k_blocks = k // 128
    n_blocks, m_blocks = triton.cdiv(n, config.block_n), triton.cdiv(m, block_m)
    target = config.programs_per_sm * _num_sms(x.device)
    splits = max(1, min(k_blocks, triton.cdiv(target, n_blocks * m_blocks)))
    per_split = triton.cdiv(k_blocks, splits)
    splits = triton.cdiv(k_blocks, per_split)
    out = torch.empty((splits, m, n), dtype=torch.float32 if splits > 1 else x.dtype, device=x.device)
    _w4_gemv_kernel[(n_blocks, splits, m_blocks)](
        x, qweight, scales, zeros, out, m, n, per_split, k_blocks,
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(1), out.stride(0),
        GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=config.block_n, USE_DOT=config.dot,
        IEEE=x.dtype == torch.float32, NUM_STAGES=config.num_stages, num_warps=config.num_warps)
    if splits == 1:
        return out[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](out, y, splits, m * n, BLOCK=1024)
    return y


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, g_idx: torch.Tensor | None = None, path: str = "auto") -> torch.Tensor:
    """x [M, K] @ W [K, N] -> [M, N] in x's dtype. `path`: auto, gemv, gemm or dequant
    (gemv: _w4_gemv_kernel where fast_gemv_fits, else the generic kernel with split K)."""
    m, k, n = _check(x, qweight, scales, zeros, group_size, g_idx)
    fits = fast_gemv_fits(k, group_size, g_idx)
    if path == "auto":
        if fits and m <= GEMM_MAX_ROWS and gemv_config(m, k, n) is not None:
            return w4a16_gemv(x, qweight, scales, zeros, group_size)
        path = "gemv" if m <= GEMV_MAX_ROWS else "gemm" if m <= GEMM_MAX_ROWS else "dequant"
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
        splits = max(1, min(k_blocks, triton.cdiv(4 * _num_sms(x.device), n_blocks)))
        k_per_split = triton.cdiv(k_blocks, splits) * block_k
        splits = triton.cdiv(k, k_per_split)
    else:
        block_m, block_n = 64, 128
        block_k, one_group = _block_k(group_size, has_g_idx, 64)
        k_per_split, splits = triton.cdiv(k, block_k) * block_k, 1
    out = torch.empty((splits, m, n), dtype=torch.float32 if splits > 1 else x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)
    _w4a16_kernel[grid](
        x, qweight, scales, zeros, gidx, out, m, n, k, k_per_split,
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(1), out.stride(0),
        GROUP_SIZE=group_size, HAS_GIDX=has_g_idx, ONE_GROUP_PER_BLOCK=one_group,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee, num_warps=4, num_stages=3)
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
