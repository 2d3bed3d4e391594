"""GGUF blocks multiplied as they are stored (issue 19's GPU part): x [M, K] @ W.T with W the raw
llama.cpp blocks gguf.py keeps, uint8 [N, K / 32, block_bytes] (rows = output features, in HF
order), for the 32-value types

    Q4_0  18 bytes: fp16 d, 16 bytes of nibbles      value = (q - 8) * d
    Q4_1  20 bytes: fp16 d, fp16 m, 16 bytes         value = q * d + m
    Q8_0  34 bytes: fp16 d, 32 int8                  value = q * d

(byte j of a 4-bit block holds value j in its low nibble and value j + 16 in its high one).

    M <= GEMV_MAX_ROWS (decode)  _gguf_gemv_kernel: per K block the integers q times x (exact
                                 integers in x's dtype: a tl.dot for 2..16 rows, FMAs for one
                                 row), the block's sums scaled by d in fp32 (plus m * sum(x) for
                                 Q4_1), fp32 accumulation, K split over programs where N alone
                                 gives too few (fp32 partials summed in split order:
                                 triton_split_k), one rounding of y
    more rows (prefill)          _gguf_dequant_kernel: the layer's blocks to x's dtype for this
                                 call (computed in fp32 as ggml does, so the values equal
                                 gguf_kernels.dequantize's), then cuBLAS

The launch tables are triton_w4a16_gemv's GemvConfig (block_n, warps, stages, programs per SM,
dot, block_m); nothing here is tuned yet (the next session's device run: benchmarks/gguf_gpu.sh).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from pagedserve.layers.quantization.triton_split_k import split_k, sum_splits
from pagedserve.layers.quantization.triton_w4a16_gemv import GemvConfig

# Rows up to which matmul takes the GEMV (the kernel takes any number: tl.dot tiles of 16 rows,
# each re-reading the blocks); more dequantize + cuBLAS. benchmarks/gguf_gpu.py's "packed64"
# sets 64 for its A/B of the 64-prompt batch (session 9: 16 kept).
GEMV_MAX_ROWS = 16
TYPE_IDS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}   # the kernels' FMT
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ONE_ROW = GemvConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=4)
FEW_ROWS = GemvConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=4, dot=True, block_m=16)


@triton.jit
def _block(qw_ptr, hw_ptr, rows, b, KB, n_valid, FMT: tl.constexpr, BB: tl.constexpr):
    """Block b of each of `rows` [BLOCK_N]: (q [BLOCK_N, 32] the integers as fp32 in the order
    _value_cols gives, d [BLOCK_N] fp32, m [BLOCK_N] fp32 (Q4_1's; zeros otherwise)). hw_ptr
    is the same bytes as fp16 (every block and row starts at an even byte)."""
    base = (rows.to(tl.int64) * KB + b) * BB
    d = tl.load(hw_ptr + base // 2, mask=n_valid, other=0.0).to(tl.float32)
    if FMT == 1:
        m = tl.load(hw_ptr + base // 2 + 1, mask=n_valid, other=0.0).to(tl.float32)
    else:
        m = tl.zeros(d.shape, dtype=tl.float32)
    if FMT == 2:
        e = tl.arange(0, 32)
        raw = tl.load(qw_ptr + base[:, None] + 2 + e[None, :], mask=n_valid[:, None], other=0)
        q = raw.to(tl.int8, bitcast=True).to(tl.float32)
    else:
        j = tl.arange(0, 16)
        raw = tl.load(qw_ptr + base[:, None] + (2 + 2 * FMT) + j[None, :], mask=n_valid[:, None], other=0)
        raw = raw.to(tl.int32)
        q = tl.join(raw & 15, raw >> 4).reshape(raw.shape[0], 32).to(tl.float32)   # value j, j + 16, ...
        if FMT == 0:
            q = q - 8.0
    return q, d, m


@triton.jit
def _value_cols(FMT: tl.constexpr):
    """The column of x (inside a block) that meets position i of _block's q: Q8_0 i; the 4-bit
    types interleave the low and high nibbles, position 2j + h is value j + 16 h."""
    i = tl.arange(0, 32)
    if FMT == 2:
        cols = i
    else:
        cols = i // 2 + 16 * (i % 2)
    return cols


@triton.jit(do_not_specialize=["M", "N", "KB", "BLOCKS_PER_SPLIT"])   # one compile across batch sizes
def _gguf_gemv_kernel(x_ptr, qw_ptr, hw_ptr, y_ptr, M, N, KB, BLOCKS_PER_SPLIT, stride_xm, stride_ym, stride_ysplit,
                      FMT: tl.constexpr, BB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      IEEE: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Programs over (N blocks, K splits, M blocks of BLOCK_M rows: 1 for FMAs, >= 16 for tl.dot);
    each K block (32 values) adds d * (x . q) (+ m * sum(x) for Q4_1) to fp32 sums; y [splits, M, N]
    (fp32 partials when split)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = rows < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < M
    cols = _value_cols(FMT)
    b_begin = pid_k * BLOCKS_PER_SPLIT
    b_end = tl.minimum(b_begin + BLOCKS_PER_SPLIT, KB)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in tl.range(b_begin, b_end, num_stages=NUM_STAGES):
        q, d, mn = _block(qw_ptr, hw_ptr, rows, b, KB, n_valid, FMT, BB)
        xs = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (b * 32 + cols)[None, :],
                     mask=m_valid[:, None], other=0.0)
        if BLOCK_M == 1:
            part = tl.sum(q * xs.to(tl.float32), 1)[None, :]
        elif IEEE:
            part = tl.dot(xs, tl.trans(q), input_precision="ieee")
        else:
            part = tl.dot(xs, tl.trans(q.to(xs.dtype)))
        acc += part * d[None, :]
        if FMT == 1:
            acc += tl.sum(xs.to(tl.float32), 1)[:, None] * mn[None, :]
    out = y_ptr + pid_k * stride_ysplit + offs_m[:, None].to(tl.int64) * stride_ym + rows[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


@triton.jit(do_not_specialize=["N", "KB"])
def _gguf_dequant_kernel(qw_ptr, hw_ptr, w_ptr, N, KB, FMT: tl.constexpr, BB: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCKS: tl.constexpr):
    """w [N, KB * 32] in w's dtype: BLOCKS K blocks (pid 1) of BLOCK_N rows (pid 0), d * q (+ m)
    in fp32 (as ggml and gguf_kernels.dequantize compute it), rounded once."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = rows < N
    for i in tl.static_range(BLOCKS):
        b = tl.program_id(1) * BLOCKS + i
        valid = n_valid & (rows * 0 + b < KB)
        q, d, m = _block(qw_ptr, hw_ptr, rows, b, KB, valid, FMT, BB)
        values = q * d[:, None]
        if FMT == 1:
            values = values + m[:, None]
        cols = b * 32 + _value_cols(FMT)
        tl.store(w_ptr + rows[:, None].to(tl.int64) * (KB * 32) + cols[None, :], values.to(w_ptr.dtype.element_ty),
                 mask=valid[:, None])


def _check(qweight: torch.Tensor, fmt: str) -> None:
    if fmt not in TYPE_IDS:
        raise ValueError(f"triton_gguf: {fmt} is not one of {sorted(TYPE_IDS)}")
    if (qweight.dtype != torch.uint8 or qweight.dim() != 3 or qweight.shape[2] != _BLOCK_BYTES[fmt]
            or not qweight.is_contiguous()):
        raise ValueError(f"triton_gguf: qweight must be contiguous uint8 [N, K / 32, {_BLOCK_BYTES[fmt]}] for "
                         f"{fmt}; got {qweight.dtype} {tuple(qweight.shape)}")


def dequantize(qweight: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """Raw blocks [N, K / 32, block_bytes] -> [N, K] in `dtype` (gguf_kernels.dequantize's values)."""
    _check(qweight, fmt)
    n, kb, bb = qweight.shape
    w = torch.empty((n, kb * 32), dtype=dtype, device=qweight.device)
    if n and kb:
        _gguf_dequant_kernel[(triton.cdiv(n, 64), triton.cdiv(kb, 4))](qweight, qweight.view(torch.float16), w, n, kb,
                                                                       FMT=TYPE_IDS[fmt], BB=bb, BLOCK_N=64, BLOCKS=4)
    return w


def gemv(x: torch.Tensor, qweight: torch.Tensor, fmt: str, config: GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] (decode-sized: the blocks are read once per 16 rows) @ W.T -> [M, N] in x's dtype
    through _gguf_gemv_kernel."""
    _check(qweight, fmt)
    m, k = x.shape
    n, kb, bb = qweight.shape
    if x.dtype not in _DTYPES or x.stride(1) != 1 or k != kb * 32:
        raise ValueError(f"triton_gguf: x must be [M, {kb * 32}] in {_DTYPES} with unit column stride; "
                         f"got {x.dtype} {tuple(x.shape)} {x.stride()}")
    config = config or (ONE_ROW if m == 1 else FEW_ROWS)
    block_m = config.block_m if config.dot else 1
    n_blocks, m_blocks = triton.cdiv(n, config.block_n), triton.cdiv(m, block_m)
    splits, per_split, partials = split_k(x, n, kb, n_blocks * m_blocks, config.programs_per_sm)
    _gguf_gemv_kernel[(n_blocks, splits, m_blocks)](
        x, qweight, qweight.view(torch.float16), partials, m, n, kb, per_split, x.stride(0), partials.stride(1),
        partials.stride(0), FMT=TYPE_IDS[fmt], BB=bb, BLOCK_M=block_m, BLOCK_N=config.block_n,
        IEEE=x.dtype == torch.float32, NUM_STAGES=config.num_stages, num_warps=config.num_warps)
    return sum_splits(partials, x.dtype)


def matmul(x: torch.Tensor, qweight: torch.Tensor, fmt: str) -> torch.Tensor:
    """x [..., K] @ W.T: the GEMV up to GEMV_MAX_ROWS rows, else the layer dequantized to x's
    dtype for this call and cuBLAS (fp32 x: an fp32 weight, exact as the reference's)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if 0 < x2.shape[0] <= GEMV_MAX_ROWS:
        y = gemv(x2, qweight, fmt)
    else:
        y = x2 @ dequantize(qweight, fmt, x.dtype).t()
    return y.reshape(*lead, qweight.shape[0])
