"""W4A16's 128-row block, shared by the decode-sized GEMVs (triton_w4a16_gemv.py) and the GEMM /
dequantization kernels (triton_w4a16.py): the block's words, scales and zeros loaded once, its
nibbles turned into floats by the LOP3 magic, the few-row tl.dot GEMV built on them, and the
launchers' argument check."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _w4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, BLOCKS_PER_SPLIT, K_BLOCKS,
                    stride_xm, stride_qk, stride_sg, stride_ym, stride_ysplit,
                    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    IEEE: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Decode-sized x [M, K] @ W for a few rows: programs over (N blocks, K splits, M blocks
    of BLOCK_M >= 16 rows); each K block is 128 rows = 16 packed int32 rows of W inside one
    group (GROUP_SIZE % 128 == 0), loaded once as [16, BLOCK_N] words. Nibble i of word r is
    row 8r + i: its values meet x's rows 8r + i. A nibble becomes a float without shifts or
    int->float conversions: nibble j of a 16-bit half, masked in place (q << 4j) and or-ed
    with the exponent of 2**(23 - 4j), reads as the fp32 2**(23 - 4j) + q exactly, so q - zero
    is one subtraction (zero points are integers 0..15), exact in x's dtype: eight
    [BLOCK_M, 16] x [16, BLOCK_N] dots per block, the scale applied to the block's sums."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, 16)
    n_valid = offs_n < N
    b_begin = pid_k * BLOCKS_PER_SPLIT
    b_end = tl.minimum(b_begin + BLOCKS_PER_SPLIT, K_BLOCKS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in tl.range(b_begin, b_end, num_stages=NUM_STAGES):
        packed, scale, zero = _load_block(qw_ptr, s_ptr, z_ptr, b, offs_n, n_valid, stride_qk, stride_sg, GROUP_SIZE)
        high = packed >> 16
        part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(4):
            for h in tl.static_range(2):
                if h == 0:
                    word = packed
                else:
                    word = high
                w = _magic_nibble(word, j, zero, x_ptr.dtype.element_ty)
                cols = b * 128 + offs_r * 8 + 4 * h + j
                xs = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + cols[None, :],
                             mask=m_valid[:, None], other=0.0)
                if IEEE:
                    part = tl.dot(xs, w, part, input_precision="ieee")
                else:
                    part = tl.dot(xs, w, part)
        acc += part * scale[None, :]
    out = y_ptr + pid_k * stride_ysplit + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


@triton.jit
def _load_block(qw_ptr, s_ptr, z_ptr, b, offs_n, n_valid, stride_qk, stride_sg, GROUP_SIZE: tl.constexpr):
    """128-row block b's [16, BLOCK_N] packed words and its group's scales and zeros (fp32)."""
    packed = tl.load(qw_ptr + (b * 16 + tl.arange(0, 16))[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                     mask=n_valid[None, :], other=0)
    group = (b * 128) // GROUP_SIZE
    scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=n_valid, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + group * stride_sg + offs_n, mask=n_valid, other=0.0).to(tl.float32)
    return packed, scale, zero


@triton.jit
def _magic_nibble(word, j: tl.constexpr, zero, dtype: tl.constexpr, scale=None):
    """q - zero in `dtype` for nibble j of each 16-bit half of `word` (the LOP3 magic: minus
    the magic's own value 2**(23 - 4j) and the zero in one FADD); with `scale`, (q - zero) *
    scale (fp32, rounded once)."""
    nib = ((word & (15 << (4 * j))) | (0x4B000000 - j * 0x02000000)).to(tl.float32, bitcast=True)
    value = nib - (zero + 8388608.0 / 16.0 ** j)[None, :]
    if scale is not None:
        value = value * scale[None, :]
    return value.to(dtype)


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
           g_idx: torch.Tensor | None, fp32_x: bool = False) -> tuple[int, int, int]:
    """(M, K, N); `fp32_x`: x may also be fp32 (a hand-off) with scales of another dtype."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"w4a16: x must be [M, K] with unit column stride; got {tuple(x.shape)} {x.stride()}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or not qweight.is_contiguous():
        raise ValueError(f"w4a16: qweight must be a contiguous int32 [K/8, N]; got {qweight.dtype} {tuple(qweight.shape)}")
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * 8 != k:
        raise ValueError(f"w4a16: x has K={k} but qweight holds {qweight.shape[0] * 8} rows")
    if (x.dtype not in _DTYPES or scales.dtype not in _DTYPES or zeros.dtype != scales.dtype
            or (scales.dtype != x.dtype and not (fp32_x and x.dtype == torch.float32))):
        raise ValueError(f"w4a16: x, scales and zeros must share a dtype in {_DTYPES}; got {x.dtype}, "
                         f"{scales.dtype}, {zeros.dtype}")
    groups = -(-k // group_size)
    if g_idx is None and (scales.shape != (groups, n) or zeros.shape != (groups, n)):
        raise ValueError(f"w4a16: scales and zeros must be [{groups}, {n}]; got {tuple(scales.shape)}, "
                         f"{tuple(zeros.shape)}")
    if g_idx is not None and (g_idx.shape != (k,) or g_idx.dtype != torch.int32 or scales.shape[1] != n):
        raise ValueError(f"w4a16: g_idx must be int32 [{k}]; got {g_idx.dtype} {tuple(g_idx.shape)}")
    # (one group: a [1, N] view's row stride is arbitrary and never used)
    if not (scales.is_contiguous() and zeros.is_contiguous() and (scales.shape[0] == 1 or scales.stride() == zeros.stride())):
        raise ValueError("w4a16: scales and zeros must be contiguous")
    return m, k, n
