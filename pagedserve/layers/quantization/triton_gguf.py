"""GGUF blocks multiplied as they are stored (issue 19's GPU part): x [M, K] @ W.T with W the raw
llama.cpp blocks gguf.py keeps, uint8 [N, K / block_values, block_bytes] (rows = output features,
in HF order), for every type gguf_kernels reads (its _unpack is the reference layout):

    Q4_0  18 bytes: fp16 d, 16 bytes of nibbles                value = (q - 8) * d
    Q4_1  20 bytes: fp16 d, fp16 m, 16 bytes                   value = q * d + m
    Q5_0  22 bytes: fp16 d, 32-bit qh, 16 bytes                value = ((q | qh bit << 4) - 16) * d
    Q5_1  24 bytes: fp16 d, fp16 m, qh, 16 bytes               value = (q | qh bit << 4) * d + m
    Q8_0  34 bytes: fp16 d, 32 int8                            value = q * d
    Q4_K  144 bytes / 256 values: fp16 d, dmin, 12 bytes of 6-bit scales and mins for 8
          sub-blocks of 32, 128 bytes of nibbles                value = d * sc * q - dmin * m
    Q5_K  176 bytes: as Q4_K with 32 bytes of 5th bits before the nibbles
    Q6_K  210 bytes / 256 values: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales
          (one per 16 values), fp16 d                           value = d * sc * (q - 32)

(byte j of a 32-value 4-bit block holds value j in its low nibble and value j + 16 in its high one).
The kernels walk K in units of one scale (32 values; Q6_K's 16): _unit gives a unit's integers,
its scale and offset (d * sc and -dmin * m computed in fp32 as ggml does) for BLOCK_N rows.

    M <= GEMV_MAX_ROWS (decode)  _gguf_gemv_kernel: per unit the weights dequantized in fp32 and
                                 rounded to x's dtype (the values the prefill path below and
                                 transformers multiply), times x (a tl.dot for 2..16 rows, FMAs
                                 for one row), fp32 accumulation, K split over programs where N
                                 alone gives too few (fp32 partials summed in split order:
                                 triton_split_k), one rounding of y. Until session 14 the
                                 integers were multiplied first and scaled per unit, the
                                 weights never rounded: the likely cause of bf16 agreement
                                 with transformers one request at a time reading 19/40 against
                                 30/40 batched (benchmarks/RESULTS.md, session 13)
    more rows (prefill)          _gguf_dequant_kernel: the layer's blocks to x's dtype for this
                                 call (computed in fp32 as ggml does, so the values equal
                                 gguf_kernels.dequantize's), then cuBLAS

The launch tables are triton_w4a16_gemv's GemvConfig (block_n, warps, stages, programs per SM,
dot, block_m): ONE_ROW / FEW_ROWS, CONFIGS per type where a device run measured better
(benchmarks/gguf_gpu.py tune). On 1B-class shapes the GEMV streams 0.4-0.8 TB/s (session 10,
H200: 1.4-2.6x cuBLAS's time on the bf16-dequantized weight, 3.5x the bytes); issuing 4-8 units'
loads per iteration did not change that (deleted): benchmarks/RESULTS.md, issue 19.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.layers.quantization.gguf_kernels import FORMATS
from pagedserve.layers.quantization.triton_split_k import split_k, sum_splits
from pagedserve.layers.quantization.triton_w4a16_gemv import GemvConfig

# Rows up to which matmul takes the GEMV (the kernel takes any number: tl.dot tiles of 16 rows,
# each re-reading the blocks); more dequantize + cuBLAS. benchmarks/gguf_gpu.py's "packed64"
# sets 64 for its A/B of the 64-prompt batch (session 9: 16 kept).
GEMV_MAX_ROWS = 16
# type: (the kernels' FMT, values per unit (the K step of the loops: one scale, one offset),
# units per block); block bytes and values per block are gguf_kernels.FORMATS'
LAYOUTS = {"Q4_0": (0, 32, 1), "Q4_1": (1, 32, 1), "Q8_0": (2, 32, 1), "Q5_0": (3, 32, 1),
           "Q5_1": (4, 32, 1), "Q4_K": (5, 32, 8), "Q5_K": (6, 32, 8), "Q6_K": (7, 16, 16)}
TYPE_IDS = {fmt: layout[0] for fmt, layout in LAYOUTS.items()}
_WITH_MIN = ("Q4_1", "Q5_1", "Q4_K", "Q5_K")   # value = q * scale + offset (the others: q * scale)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ONE_ROW = GemvConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=4)
FEW_ROWS = GemvConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=4, dot=True, block_m=16)
# per type (one row, 2..GEMV_MAX_ROWS rows) where a device run measured better than the above:
# 2 warps at one row, 15-34% less time for one 1B-class layer's four products in both of session
# 10's H200 runs (benchmarks/gguf_gpu.py tune; Q5_0, Q6_K, Q8_0 within 5%: the default kept)
_ONE_ROW_2W = GemvConfig(block_n=64, num_warps=2, num_stages=3, programs_per_sm=4)
CONFIGS: dict[str, tuple[GemvConfig, GemvConfig]] = {fmt: (_ONE_ROW_2W, FEW_ROWS)
                                                     for fmt in ("Q4_0", "Q4_1", "Q5_1", "Q4_K", "Q5_K")}


@triton.jit
def _unit(qw_ptr, hw_ptr, rows, u, KB, n_valid, FMT: tl.constexpr, BB: tl.constexpr, VB: tl.constexpr,
          UPB: tl.constexpr):
    """Unit u (VB values sharing one scale: block u // UPB, its sub-block u % UPB) of each of
    `rows` [BLOCK_N]: (q [BLOCK_N, VB] the integers as fp32 in the order _value_cols gives,
    scale [BLOCK_N] fp32, offset [BLOCK_N] fp32 (zeros for the types without one)), the scale
    and offset computed in fp32 as ggml does. hw_ptr is the same bytes as fp16 (every block
    and row starts at an even byte)."""
    b = u // UPB
    j = u % UPB
    base = (rows.to(tl.int64) * KB + b) * BB
    if FMT == 7:   # Q6_K: ql[128], qh[64], int8 scales[16], fp16 d; unit j = values 16 j ..
        d = tl.load(hw_ptr + (base + 208) // 2, mask=n_valid, other=0.0).to(tl.float32)
        sc = tl.load(qw_ptr + base + 192 + j, mask=n_valid, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        h = j // 8
        run = (j % 8) // 2
        pos = 16 * (j % 2) + tl.arange(0, 16)
        ql = tl.load(qw_ptr + base[:, None] + (64 * h + 32 * (run % 2)) + pos[None, :], mask=n_valid[:, None],
                     other=0).to(tl.int32)
        qh = tl.load(qw_ptr + base[:, None] + (128 + 32 * h) + pos[None, :], mask=n_valid[:, None],
                     other=0).to(tl.int32)
        q = (((ql >> (4 * (run // 2))) & 15) | (((qh >> (2 * run)) & 3) << 4)).to(tl.float32) - 32.0
        scale = d * sc
        offset = tl.zeros(d.shape, dtype=tl.float32)
    elif FMT == 5 or FMT == 6:   # Q4_K / Q5_K: fp16 d, dmin, 12 bytes of 6-bit scales / mins, ...
        d = tl.load(hw_ptr + base // 2, mask=n_valid, other=0.0).to(tl.float32)
        dmin = tl.load(hw_ptr + base // 2 + 1, mask=n_valid, other=0.0).to(tl.float32)
        s_j = tl.load(qw_ptr + base + 4 + j, mask=n_valid, other=0).to(tl.int32)
        s_j4 = tl.load(qw_ptr + base + 8 + j, mask=n_valid, other=0).to(tl.int32)
        s_lo = tl.load(qw_ptr + base + 4 + j % 4, mask=n_valid, other=0).to(tl.int32)   # s[j - 4] for j >= 4
        low = j < 4   # get_scale_min_k4
        sc = tl.where(low, s_j & 63, (s_j4 & 15) | ((s_lo >> 6) << 4)).to(tl.float32)
        mn = tl.where(low, s_j4 & 63, (s_j4 >> 4) | ((s_j >> 6) << 4)).to(tl.float32)
        l = tl.arange(0, 32)
        qoff = 16 if FMT == 5 else 48   # after Q5_K's 32 bytes of 5th bits
        raw = tl.load(qw_ptr + base[:, None] + qoff + 32 * (j // 2) + l[None, :], mask=n_valid[:, None], other=0)
        qi = (raw.to(tl.int32) >> (4 * (j % 2))) & 15   # sub-block 2i: chunk i's low nibbles, 2i + 1: high
        if FMT == 6:   # bit j of qh[l]
            qh = tl.load(qw_ptr + base[:, None] + 16 + l[None, :], mask=n_valid[:, None], other=0).to(tl.int32)
            qi = qi | (((qh >> j) & 1) << 4)
        q = qi.to(tl.float32)
        scale = d * sc
        offset = -dmin * mn
    else:
        scale = tl.load(hw_ptr + base // 2, mask=n_valid, other=0.0).to(tl.float32)
        if FMT == 1 or FMT == 4:
            offset = tl.load(hw_ptr + base // 2 + 1, mask=n_valid, other=0.0).to(tl.float32)
        else:
            offset = tl.zeros(scale.shape, dtype=tl.float32)
        if FMT == 2:
            e = tl.arange(0, 32)
            raw = tl.load(qw_ptr + base[:, None] + 2 + e[None, :], mask=n_valid[:, None], other=0)
            q = raw.to(tl.int8, bitcast=True).to(tl.float32)
        else:   # Q4_0 / Q4_1 / Q5_0 / Q5_1: [d, (m), (qh: 4 bytes), 16 bytes of nibbles]
            head = 2 if FMT == 0 else (4 if FMT == 1 else (6 if FMT == 3 else 8))
            j16 = tl.arange(0, 16)
            raw = tl.load(qw_ptr + base[:, None] + head + j16[None, :], mask=n_valid[:, None], other=0)
            raw = raw.to(tl.int32)
            qi = tl.join(raw & 15, raw >> 4).reshape(raw.shape[0], 32)   # value j, j + 16, ...
            if FMT == 3 or FMT == 4:   # the 5th bit of value v: bit v of the little-endian qh
                at = head - 4
                qh = tl.load(qw_ptr + base + at, mask=n_valid, other=0).to(tl.int32)
                qh |= tl.load(qw_ptr + base + at + 1, mask=n_valid, other=0).to(tl.int32) << 8
                qh |= tl.load(qw_ptr + base + at + 2, mask=n_valid, other=0).to(tl.int32) << 16
                qh |= tl.load(qw_ptr + base + at + 3, mask=n_valid, other=0).to(tl.int32) << 24
                qi = qi | (((qh[:, None] >> _value_cols(FMT, 32)[None, :]) & 1) << 4)
            q = qi.to(tl.float32)
            if FMT == 0:
                q = q - 8.0
            elif FMT == 3:
                q = q - 16.0
    return q, scale, offset


@triton.jit
def _value_cols(FMT: tl.constexpr, VB: tl.constexpr):
    """The column of x (inside a unit) that meets position i of _unit's q: i, except for the
    32-value 4- and 5-bit types, which interleave the low and high nibbles: position 2j + h is
    value j + 16 h."""
    i = tl.arange(0, VB)
    if FMT == 0 or FMT == 1 or FMT == 3 or FMT == 4:
        cols = i // 2 + 16 * (i % 2)
    else:
        cols = i
    return cols


@triton.jit
def _values(q, scale, offset, HAS_MIN: tl.constexpr):
    """A unit's weights [BLOCK_N, VB] in fp32: scale * q (+ offset), as ggml computes them; the one
    expression of both kernels, so that the GEMV multiplies the values the dequantization stores."""
    values = q * scale[:, None]
    if HAS_MIN:
        values = values + offset[:, None]
    return values


@triton.jit(do_not_specialize=["M", "N", "KB", "UNITS_PER_SPLIT"])   # one compile across batch sizes
def _gguf_gemv_kernel(x_ptr, qw_ptr, hw_ptr, y_ptr, M, N, KB, UNITS_PER_SPLIT, stride_xm, stride_ym, stride_ysplit,
                      FMT: tl.constexpr, BB: tl.constexpr, VB: tl.constexpr, UPB: tl.constexpr,
                      HAS_MIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      IEEE: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Programs over (N blocks, K splits, M blocks of BLOCK_M rows: 1 for FMAs, >= 16 for tl.dot);
    each unit's weights are dequantized and rounded to x's dtype (the values the prefill path's
    dequantization stores, and transformers multiplies), then multiplied with x into fp32 sums;
    y [splits, M, N] (fp32 partials when split)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = rows < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < M
    cols = _value_cols(FMT, VB)
    u_begin = pid_k * UNITS_PER_SPLIT
    u_end = tl.minimum(u_begin + UNITS_PER_SPLIT, KB * UPB)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for u in tl.range(u_begin, u_end, num_stages=NUM_STAGES):
        q, d, mn = _unit(qw_ptr, hw_ptr, rows, u, KB, n_valid, FMT, BB, VB, UPB)
        w = _values(q, d, mn, HAS_MIN).to(x_ptr.dtype.element_ty)
        xs = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (u * VB + cols)[None, :],
                     mask=m_valid[:, None], other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(w.to(tl.float32) * xs.to(tl.float32), 1)[None, :]
        elif IEEE:
            acc = tl.dot(xs, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(xs, tl.trans(w), acc)
    out = y_ptr + pid_k * stride_ysplit + offs_m[:, None].to(tl.int64) * stride_ym + rows[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


@triton.jit(do_not_specialize=["N", "KB"])
def _gguf_dequant_kernel(qw_ptr, hw_ptr, w_ptr, N, KB, FMT: tl.constexpr, BB: tl.constexpr, VB: tl.constexpr,
                         UPB: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_N: tl.constexpr, UNITS: tl.constexpr):
    """w [N, KB * UPB * VB] in w's dtype: UNITS units (pid 1) of BLOCK_N rows (pid 0), scale * q
    (+ offset) in fp32 (as ggml and gguf_kernels.dequantize compute it), rounded once."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = rows < N
    for i in tl.static_range(UNITS):
        u = tl.program_id(1) * UNITS + i
        valid = n_valid & (rows * 0 + u < KB * UPB)
        q, d, m = _unit(qw_ptr, hw_ptr, rows, u, KB, valid, FMT, BB, VB, UPB)
        cols = u * VB + _value_cols(FMT, VB)
        tl.store(w_ptr + rows[:, None].to(tl.int64) * (KB * UPB * VB) + cols[None, :],
                 _values(q, d, m, HAS_MIN).to(w_ptr.dtype.element_ty), mask=valid[:, None])


def _check(qweight: torch.Tensor, fmt: str) -> None:
    if fmt not in TYPE_IDS:
        raise ValueError(f"triton_gguf: {fmt} is not one of {sorted(TYPE_IDS)}")
    spec = FORMATS[fmt]
    if (qweight.dtype != torch.uint8 or qweight.dim() != 3 or qweight.shape[2] != spec.nbytes
            or not qweight.is_contiguous()):
        raise ValueError(f"triton_gguf: qweight must be contiguous uint8 [N, K / {spec.elems}, {spec.nbytes}] "
                         f"for {fmt}; got {qweight.dtype} {tuple(qweight.shape)}")


def _constants(fmt: str) -> dict:
    type_id, vb, upb = LAYOUTS[fmt]
    return dict(FMT=type_id, BB=FORMATS[fmt].nbytes, VB=vb, UPB=upb, HAS_MIN=fmt in _WITH_MIN)


def dequantize(qweight: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """Raw blocks [N, K / block_values, block_bytes] -> [N, K] in `dtype` (gguf_kernels.dequantize's
    values)."""
    _check(qweight, fmt)
    n, kb, _ = qweight.shape
    _, vb, upb = LAYOUTS[fmt]
    units = kb * upb
    w = torch.empty((n, units * vb), dtype=dtype, device=qweight.device)
    if n and kb:
        per_program = 128 // vb   # 128 values of each of 64 rows per program
        _gguf_dequant_kernel[(triton.cdiv(n, 64), triton.cdiv(units, per_program))](
            qweight, qweight.view(torch.float16), w, n, kb, **_constants(fmt), BLOCK_N=64, UNITS=per_program)
    return w


def gemv(x: torch.Tensor, qweight: torch.Tensor, fmt: str, config: GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] (decode-sized: the blocks are read once per 16 rows) @ W.T -> [M, N] in x's dtype
    through _gguf_gemv_kernel."""
    _check(qweight, fmt)
    m, k = x.shape
    n, kb, _ = qweight.shape
    _, vb, upb = LAYOUTS[fmt]
    units = kb * upb
    if x.dtype not in _DTYPES or x.stride(1) != 1 or k != units * vb:
        raise ValueError(f"triton_gguf: x must be [M, {units * vb}] in {_DTYPES} with unit column stride; "
                         f"got {x.dtype} {tuple(x.shape)} {x.stride()}")
    if config is None:
        one, few = CONFIGS.get(fmt, (ONE_ROW, FEW_ROWS))
        config = one if m == 1 else few
    block_m = config.block_m if config.dot else 1
    n_blocks, m_blocks = triton.cdiv(n, config.block_n), triton.cdiv(m, block_m)
    splits, per_split, partials = split_k(x, n, units, n_blocks * m_blocks, config.programs_per_sm)
    _gguf_gemv_kernel[(n_blocks, splits, m_blocks)](
        x, qweight, qweight.view(torch.float16), partials, m, n, kb, per_split, x.stride(0), partials.stride(1),
        partials.stride(0), **_constants(fmt), BLOCK_M=block_m, BLOCK_N=config.block_n,
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
