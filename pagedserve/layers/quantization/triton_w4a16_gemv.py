"""The decode-sized W4A16 kernels (one to a few rows of x): y = x @ W with W in int4.py's
layout (qweight int32 [K/8, N], scales / zeros [G, N]) where every 128-row block of K lies in
one group (fast_gemv_fits), each packed word loaded once. triton_w4a16.py routes to them (and
holds the GEMM, dequantization and act-order paths); launches are tuned by
benchmarks/w4_gpu.py and benchmarks/w4_gemv_gpu.py (one row, session 8).

    _w4_gemv_fma_kernel   one row per program: FMAs, a nibble masked in place and read as a
                          denormal float (one LOP3 + one FFMA per weight), x prologues (SiLU-
                          and-mul, RMSNorm with the residual add), K split over programs
                          (summed in the kernel: by its last program from stored partials in
                          split order, or from fp32 atomic sums; or handed on unrounded:
                          w4a16_handoff.py), optional register prefetch
    _w4_gemv_kernel       a few rows: eight tl.dots per 128-row block (triton_w4a16_blocks.py)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedserve.layers.quantization.triton_split_k import split_count, split_k, sum_splits
from pagedserve.layers.quantization.triton_w4a16_blocks import _check, _w4_gemv_kernel
from pagedserve.layers.triton_ops import _LIBDEVICE, silu_mul

GEMV_MAX_ROWS = 16
LIBDEVICE = tl.constexpr(_LIBDEVICE)   # silu_mul's exp (not under the interpreter)


@triton.jit
def _load(ptr, mask, EVICT: tl.constexpr):
    """tl.load, `mask` None or a bool (tensor); what is masked is undefined (no zeroing moves:
    only columns past N and blocks past a split's end, whose sums are not used); EVICT:
    evict-first (weights read once a step: leave L2 to what is read again)."""
    if mask is None:
        if EVICT:
            value = tl.load(ptr, eviction_policy="evict_first")
        else:
            value = tl.load(ptr)
    else:
        if EVICT:
            value = tl.load(ptr, mask=mask, eviction_policy="evict_first")
        else:
            value = tl.load(ptr, mask=mask)
    return value


@triton.jit
def _x_load(x_ptr, row, col, up, res_ptr, nw_ptr, live, WORDS: tl.constexpr, PROLOGUE: tl.constexpr):
    """The raw x operands of K rows col .. col + 8 * WORDS as [WORDS, 8] tiles (see _x_nibbles):
    (x or gate, up / residual, norm weight), x's tile where one is not used; `live` as in _w_load."""
    idx = tl.arange(0, WORDS)[:, None] * 8 + tl.arange(0, 8)[None, :]
    if live is not None:
        live = tl.zeros([WORDS, 8], dtype=tl.int32) < live
    a = _load(x_ptr + row + col + idx, live, False)
    b = a
    c = a
    if PROLOGUE == 1 or PROLOGUE == 4:
        b = _load(x_ptr + row + col + idx + up, live, False)
    if PROLOGUE == 3:
        b = _load(res_ptr + row + col + idx, live, False)
    if PROLOGUE == 2 or PROLOGUE == 3:
        c = _load(nw_ptr + col + idx, live, False)
    return a, b, c


@triton.jit
def _x_nibbles(a, b, c, row, col, res_out_ptr, res_limit, x_scale, WORDS: tl.constexpr, PROLOGUE: tl.constexpr):
    """x[row + col + 8r + i] (r < WORDS, i < 8) as fp32 times 2**(89 - place of nibble i) (see
    _w4_gemv_fma_kernel), one [WORDS] vector per nibble i, from _x_load's tiles split in
    registers (three halvings of the nibble axis); the sum of the unscaled x; and for the
    norm prologues the sum of squares of h. PROLOGUE: 0 x as it is; 1 SILU: a = gate, b = up,
    x = silu(gate) * up rounded as SiluAndMul rounds it; 2 NORM: h = a, 3 NORM_RESIDUAL:
    h = a + b (the residual; rounded to the residual's dtype, stored to res_out where index <
    res_limit; a may be fp32: a hand-off), x = h * c (the norm weight; the row's rsqrt comes
    after); 4 SILU of a norm launch's hand-off: a, b are fp32 sums before that launch's rsqrt,
    x_scale, so x = silu(a * x_scale) * (b * x_scale), unrounded."""
    offs_i = tl.arange(0, 8)
    idx = tl.arange(0, WORDS)[:, None] * 8 + offs_i[None, :]
    sq = 0.0
    if PROLOGUE == 1:
        xb = silu_mul(a, b, LIBDEVICE).to(tl.float32)
    elif PROLOGUE == 4:
        xb = silu_mul(a * x_scale, b * x_scale, LIBDEVICE)
    elif PROLOGUE == 2 or PROLOGUE == 3:
        h = a
        if PROLOGUE == 3:
            if a.dtype != b.dtype:   # an fp32 hand-off plus the residual: rounded once, as the residual
                h = (a.to(tl.float32) + b.to(tl.float32)).to(b.dtype)
            else:
                h = h + b
            tl.store(res_out_ptr + row + col + idx, h, mask=idx < res_limit)
        hf = h.to(tl.float32)
        sq = tl.sum(tl.sum(hf * hf, 1), 0)
        xb = hf * c.to(tl.float32)
    else:
        xb = a.to(tl.float32)
    x_sum = tl.sum(tl.sum(xb, 1), 0)
    place = tl.where(offs_i < 5, 4 * offs_i, 4 * offs_i - 12)   # the nibble's bits in _w4_gemv_fma_kernel
    factor = ((127 + 89 - place) << 23).to(tl.float32, bitcast=True)
    xb = xb * factor[None, :]
    even, odd = tl.split(xb.reshape(WORDS, 4, 2))     # i = 2u, 2u + 1
    e0, e1 = tl.split(even.reshape(WORDS, 2, 2))       # i = 4v, 4v + 2
    o0, o1 = tl.split(odd.reshape(WORDS, 2, 2))        # i = 4v + 1, 4v + 3
    x0, x4 = tl.split(e0)
    x2, x6 = tl.split(e1)
    x1, x5 = tl.split(o0)
    x3, x7 = tl.split(o1)
    return x0, x1, x2, x3, x4, x5, x6, x7, x_sum, sq


@triton.jit
def _w_load(qw_ptr, s_ptr, z_ptr, b, offs_r, offs_n, n_valid, live, stride_qk, stride_sg,
            GROUP_SIZE: tl.constexpr, WORDS: tl.constexpr, EVEN_N: tl.constexpr, EVICT: tl.constexpr):
    """K block b's packed words [WORDS, BLOCK_N] and its group's scales and zeros (as stored);
    `live`: None, or an int32 scalar, 0 to mask the whole block (a prefetch past the end)."""
    words = qw_ptr + (b * WORDS + offs_r)[:, None].to(tl.int64) * stride_qk + offs_n[None, :]
    group = (b * WORDS * 8) // GROUP_SIZE
    if live is None:
        if EVEN_N:
            wmask = None
            smask = None
        else:
            wmask = n_valid[None, :]
            smask = n_valid
    else:   # live (0 / 1) made a tensor of one value (constant along N: the loads stay vectors)
        smask = tl.zeros(offs_n.shape, dtype=tl.int32) < live
        if not EVEN_N:
            smask = smask & n_valid
        wmask = (tl.zeros([WORDS, 1], dtype=tl.int32) < live) & smask[None, :]
    packed = _load(words, wmask, EVICT)
    scale = _load(s_ptr + group * stride_sg + offs_n, smask, False)
    zero = _load(z_ptr + group * stride_sg + offs_n, smask, False)
    return packed, scale, zero


@triton.jit
def _fma_block(packed, scale, zero, x0, x1, x2, x3, x4, x5, x6, x7, x_sum):
    """One K block's contribution to the [BLOCK_N] sums (see _w4_gemv_fma_kernel)."""
    high = packed >> 12   # nibbles 5..7 to bits 8..19: below the exponent, like 0..4 in place
    part = _nibble(packed, 0) * x0[:, None]
    part += _nibble(packed, 1) * x1[:, None]
    part += _nibble(packed, 2) * x2[:, None]
    part += _nibble(packed, 3) * x3[:, None]
    part += _nibble(packed, 4) * x4[:, None]
    part += _nibble(high, 2) * x5[:, None]
    part += _nibble(high, 3) * x6[:, None]
    part += _nibble(high, 4) * x7[:, None]
    return (tl.sum(part, 0) * 1.152921504606847e18 - zero.to(tl.float32) * x_sum) * scale.to(tl.float32)   # 2**60


@triton.jit
def _nibble(word, j: tl.constexpr):
    """Bits 4j..4j+3 of `word` left in place (j <= 4: below fp32's exponent), read as a float:
    q * 2**(4j - 149), a denormal (exact: FFMA keeps fp32 denormals unless told to flush)."""
    return (word & (15 << (4 * j))).to(tl.float32, bitcast=True)


@triton.jit
def _w4_gemv_fma_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, p_ptr, c_ptr, N, BLOCKS_PER_SPLIT, K_BLOCKS,
                        stride_xm, stride_qk: tl.constexpr, stride_sg, stride_ym, up, res_ptr, res_out_ptr, nw_ptr, q_ptr, eps,
                        xq_ptr, x_inv_k, x_eps,
                        GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
                        EVEN_N: tl.constexpr, SPLIT: tl.constexpr, PROLOGUE: tl.constexpr,
                        NUM_STAGES: tl.constexpr, ATOMIC: tl.constexpr = False, SPLITS: tl.constexpr = 1,
                        PREFETCH: tl.constexpr = False, EVICT: tl.constexpr = False, HANDOFF: tl.constexpr = False):
    """One row of x per program (M = pid 2) @ W over BLOCK_N columns and a range of K blocks
    of 8 * WORDS rows (inside one group). Meant for BLOCK_N >= 4 * 32 * num_warps: threads
    and warps then lie along N, each thread holds all WORDS words of its columns, loads a
    block's scale and zero once per column and its 8 * WORDS x values once (one [WORDS, 8]
    load, split in registers). Each nibble costs one LOP3 (masked at bit p = 4i for nibbles
    i <= 4, of the word shifted by 12 bits for 5..7 (one SHF per word), its bits read as the
    denormal float q * 2**(p - 149)) and one FFMA with x scaled by 2**(89 - p): the products
    are q * x * 2**-60 in every place, exact, far from fp32's overflow (|x| < 2**38) and
    underflow; the zero comes off per block and column as zero * sum(x). Accumulation is
    fp32 throughout.
    y and the partials are [.., M, N] with row stride N (stride_ym). SPLIT: programs along K
    write fp32 partials to p_ptr [splits, M, N]; the last one of an (M, N) tile to arrive (a
    per-tile counter in c_ptr, reset by it) sums them into y in split order (SPLITS, the
    grid's K extent as a constexpr: every partial's load issued at once, one round trip; the
    same bits every run), so split K needs no second launch. Otherwise each writes its sum to y [splits, M, N] (fp32 partials when split).
    ATOMIC (with SPLIT): the programs add their sums into p_ptr [M, N] (their squares into
    q_ptr [tiles]) with fp32 atomics instead, zero before the launch; the last one of a tile
    reads them once and leaves them zero (after a barrier: Triton may give the zeroing store
    another thread-to-element map than the read): a fix-up of one read however many splits.
    The order of the adds varies, so the last bit of y may differ between runs.
    HANDOFF (instead of SPLIT): every program adds its fp32 sums into y [M, N] (row stride
    stride_ym), zero before the launch, and ends: no counter, no read-back, no rounding; y is
    the hand-off its consumer reads as it is (see w4a16_gemv). With a norm prologue the rsqrt
    is left to the consumer: the programs of the first N block add their squares into q_ptr [M].
    PROLOGUE (see _x_nibbles): 1 silu(gate) * up; 2, 3 RMSNorm (with the residual add, h
    written out by the programs of the first N block): the block sums see h * norm weight,
    the row's rsqrt(mean(h^2) + eps) scales the sum at the end (the squares of a split's K
    range summed in q_ptr [splits, M] when split: then only with SPLIT); 4 silu(gate) * up of
    a norm launch's hand-off, scaled first by rsqrt(xq_ptr[m] * x_inv_k + x_eps).
    PREFETCH: the next block's weights, scales and x operands are loaded into registers before
    this block's FMAs (no shared-memory pipeline); EVICT: weights loaded evict-first.
    stride_qk (N) is a constexpr: the words' rows are immediate offsets from one address."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, WORDS)
    n_valid = offs_n < N
    b_begin = pid_k * BLOCKS_PER_SPLIT
    b_end = tl.minimum(b_begin + BLOCKS_PER_SPLIT, K_BLOCKS)
    x_row = pid_m.to(tl.int64) * stride_xm
    x_scale = 1.0
    if PROLOGUE == 4:
        x_scale = tl.rsqrt(tl.load(xq_ptr + pid_m) * x_inv_k + x_eps)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    squares = 0.0
    res_limit = tl.where(pid_n == 0, WORDS * 8, 0)
    if PREFETCH:   # registers double-buffered: block b + 1's loads issued before block b's FMAs
        nxt = _w_load(qw_ptr, s_ptr, z_ptr, b_begin, offs_r, offs_n, n_valid, (b_begin < b_end).to(tl.int32), stride_qk,
                      stride_sg, GROUP_SIZE, WORDS, EVEN_N, EVICT)
        nxt_x = _x_load(x_ptr, x_row, b_begin * WORDS * 8, up, res_ptr, nw_ptr, (b_begin < b_end).to(tl.int32), WORDS, PROLOGUE)
        for b in tl.range(b_begin, b_end, num_stages=1):
            packed, scale, zero = nxt
            a, r, w = nxt_x
            nxt = _w_load(qw_ptr, s_ptr, z_ptr, b + 1, offs_r, offs_n, n_valid, (b + 1 < b_end).to(tl.int32), stride_qk,
                          stride_sg, GROUP_SIZE, WORDS, EVEN_N, EVICT)
            nxt_x = _x_load(x_ptr, x_row, (b + 1) * WORDS * 8, up, res_ptr, nw_ptr, (b + 1 < b_end).to(tl.int32), WORDS, PROLOGUE)
            x0, x1, x2, x3, x4, x5, x6, x7, x_sum, sq = _x_nibbles(a, r, w, x_row, b * WORDS * 8, res_out_ptr,
                                                                    res_limit, x_scale, WORDS, PROLOGUE)
            squares += sq
            acc += _fma_block(packed, scale, zero, x0, x1, x2, x3, x4, x5, x6, x7, x_sum)
    else:
        for b in tl.range(b_begin, b_end, num_stages=NUM_STAGES):
            packed, scale, zero = _w_load(qw_ptr, s_ptr, z_ptr, b, offs_r, offs_n, n_valid, None, stride_qk,
                                          stride_sg, GROUP_SIZE, WORDS, EVEN_N, EVICT)
            a, r, w = _x_load(x_ptr, x_row, b * WORDS * 8, up, res_ptr, nw_ptr, None, WORDS, PROLOGUE)
            x0, x1, x2, x3, x4, x5, x6, x7, x_sum, sq = _x_nibbles(a, r, w, x_row, b * WORDS * 8, res_out_ptr,
                                                                    res_limit, x_scale, WORDS, PROLOGUE)
            squares += sq
            acc += _fma_block(packed, scale, zero, x0, x1, x2, x3, x4, x5, x6, x7, x_sum)
    row = (pid_k * tl.num_programs(2) + pid_m).to(tl.int64) * stride_ym   # [splits, M, N] when split
    inv_k = 1.0 / (K_BLOCKS * WORDS * 8)
    if HANDOFF:   # the sums added unrounded into the zeroed hand-off; nothing waits on them here
        tl.atomic_add(y_ptr + pid_m.to(tl.int64) * stride_ym + offs_n, acc, mask=n_valid, sem="relaxed")
        if PROLOGUE == 2 or PROLOGUE == 3:
            tl.atomic_add(q_ptr + pid_m, squares, mask=pid_n == 0, sem="relaxed")
    elif SPLIT:
        tile = pid_m * tl.num_programs(0) + pid_n
        sums = p_ptr + pid_m.to(tl.int64) * stride_ym + offs_n   # ATOMIC: [M, N], zero between calls
        if ATOMIC:   # squares per tile: the tiles of a row are summed (and zeroed) at different times
            tl.atomic_add(sums, acc, mask=n_valid, sem="relaxed")
            if PROLOGUE == 2 or PROLOGUE == 3:
                tl.atomic_add(q_ptr + tile, squares, sem="relaxed")
        else:
            tl.store(p_ptr + row + offs_n, acc, mask=n_valid)
            if PROLOGUE == 2 or PROLOGUE == 3:
                tl.store(q_ptr + pid_k * tl.num_programs(2) + pid_m, squares)
        tl.debug_barrier()   # every thread's partial stored before the one arrival below
        if tl.atomic_add(c_ptr + tile, 1, sem="acq_rel") == tl.num_programs(1) - 1:
            if ATOMIC:   # one read of the sums, then zero them for the next call
                total = tl.load(sums, mask=n_valid, other=0.0, cache_modifier=".cg")
                if PROLOGUE == 2 or PROLOGUE == 3:
                    squares = tl.load(q_ptr + tile, cache_modifier=".cg")
                tl.debug_barrier()   # every thread's read done before any thread zeroes
                tl.store(sums, tl.zeros([BLOCK_N], dtype=tl.float32), mask=n_valid)
                if PROLOGUE == 2 or PROLOGUE == 3:
                    tl.store(q_ptr + tile, 0.0)
            else:
                total = tl.zeros([BLOCK_N], dtype=tl.float32)
                squares = 0.0
                for s in tl.static_range(SPLITS):   # unrolled: every load in flight at once, summed in order
                    total += tl.load(p_ptr + (s * tl.num_programs(2) + pid_m).to(tl.int64) * stride_ym + offs_n,
                                     mask=n_valid, other=0.0, cache_modifier=".cg")
                    if PROLOGUE == 2 or PROLOGUE == 3:
                        squares += tl.load(q_ptr + s * tl.num_programs(2) + pid_m, cache_modifier=".cg")
            if PROLOGUE == 2 or PROLOGUE == 3:
                total = total * tl.rsqrt(squares * inv_k + eps)
            tl.store(y_ptr + pid_m.to(tl.int64) * stride_ym + offs_n, total.to(y_ptr.dtype.element_ty), mask=n_valid)
            # relaxed: the next launch sees the reset after the kernel boundary; acq_rel (the default)
            # put a MEMBAR.GPU before it, the tile's last program waiting on its stores before the
            # kernel could end (0.3-0.65 us a launch on the H200: QUANT.md, session 10)
            tl.atomic_xchg(c_ptr + tile, 0, sem="relaxed")
    else:
        if PROLOGUE == 2 or PROLOGUE == 3:
            acc = acc * tl.rsqrt(squares * inv_k + eps)
        tl.store(y_ptr + row + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_valid)


@dataclass(frozen=True)
class GemvConfig:
    """A decode-sized launch: BLOCK_N, warps, pipeline stages, how many programs per SM the K
    split aims for (split K only when N alone gives too few), and FMA (_w4_gemv_fma_kernel,
    one row per program, K blocks of 8 * `words` rows; `fixup`: split K summed in the kernel
    by the last program of a tile, else by triton_split_k.sum_splits) or tl.dot (_w4_gemv_kernel,
    `block_m` >= 16 rows per program). benchmarks/w4_gpu.py sweeps them."""

    block_n: int = 512
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 4   # 0: never split K
    dot: bool = False
    block_m: int = 16   # rows per program of the tl.dot launch (>= 16)
    words: int = 16     # packed rows per K block of the FMA launch (16: 128 rows of K)
    fixup: bool = True
    atomic: bool = False  # FMA split K: fp32 atomic adds into zeroed sums, one read by the last program
    #                       (not bitwise repeatable: the adds' order varies); else the last program
    #                       sums the stored partials in split order (repeatable)
    prefetch: bool = False  # FMA: the next K block's loads into registers before this one's FMAs
    #                         (no shared-memory pipeline: num_stages unused)
    evict: bool = False     # FMA: weights loaded evict-first


FMA_GEMV = GemvConfig()
DOT_GEMV = GemvConfig(block_n=128, dot=True)
# (rows bucket, K, N) -> the measured best launch: benchmarks/w4_gpu.py's sweep on an H200
# (llama-8b's qkv / o / gate_up / down, bf16, group 128; benchmarks/QUANT.md), 4 and 16 rows from
# 2026-11-30. One row: benchmarks/w4_gemv_gpu.py's sweep with each projection's fused prologue,
# session 9 (gpu/2026-12-01-h200-s9-w4h): qkv 7.92 us (session 8's launch), o 6.72 and down 12.47
# (256 columns on two warps, the next block's loads in registers before this one's FMAs, weights
# evict-first), gate_up 20.34 (8 columns a thread on one warp: the x work and addressing shared
# by twice the weights); b1_decode 408.8 -> 444.2 tok/s (1.905x bf16; a second call: 444.8, 1.93x,
# and none of 40 neighbouring launches faster: gpu/2026-12-01-h200-s9-w4h-call2; session 10, the tile
# counter reset without a fence: 444.9 -> 452.3, gpu/2026-12-01-h200-s10-w4i). Split K is summed by fp32
# atomics: the last bit of a one-row output depends on the order the programs finish (the
# split-order sum, repeatable, measured 406.1 tok/s with its best launches: not the default).
# Buckets of more than GEMV_MAX_ROWS rows are used only where the sweep found this kernel
# faster than the GEMM / dequantize paths (there it did not).
TUNED: dict[tuple[int, int, int], GemvConfig] = {
    (1, 4096, 6144): GemvConfig(block_n=128, num_warps=1, programs_per_sm=8, words=8, atomic=True),
    (1, 4096, 4096): GemvConfig(block_n=256, num_warps=2, words=8, atomic=True, prefetch=True, evict=True),
    (1, 4096, 28672): GemvConfig(block_n=256, num_warps=1, programs_per_sm=8, words=8, atomic=True),
    (1, 14336, 4096): GemvConfig(block_n=256, num_warps=2, words=8, atomic=True, prefetch=True, evict=True),
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
    return next(b for b in (1, 4, 16, 64, 256, 512) if m <= b) if m <= 512 else m


def gemv_config(m: int, k: int, n: int) -> GemvConfig | None:
    default = None if m > GEMV_MAX_ROWS else FMA_GEMV if m == 1 else DOT_GEMV
    return TUNED.get((rows_bucket(m), k, n), default)


def fast_gemv_fits(k: int, group_size: int, g_idx: torch.Tensor | None) -> bool:
    """_w4_gemv_kernel's 128-row K blocks each lie in one group: no act-order gather left."""
    return g_idx is None and group_size % 128 == 0 and k % 128 == 0


_TILE_COUNTERS: dict[torch.device, torch.Tensor] = {}
_ZERO_SUMS: dict[torch.device, torch.Tensor] = {}
_SQUARES = 1 << 16   # the zeroed scratch's tail: each (row, N block) tile's sum of squares (norm prologues)


def _zero_sums(device: torch.device, size: int) -> torch.Tensor | None:
    """fp32 scratch kept zero between launches (each atomic launch's last programs zero what they
    read): [size] sums at the front, _SQUARES at the end; like the counters, allocated outside
    capture (None then, or when `size` does not fit)."""
    if device not in _ZERO_SUMS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _ZERO_SUMS[device] = torch.zeros(1 << 20, dtype=torch.float32, device=device)
    return _ZERO_SUMS[device] if size <= (1 << 20) - _SQUARES else None


def _tile_counters(device: torch.device) -> torch.Tensor | None:
    """Arrival counters of the FMA kernel's split-K tiles (each reset to 0 by its last
    program), allocated by a device's first split launch outside CUDA graph capture (None
    until then: the launch sums its splits with triton_split_k.sum_splits)."""
    if device not in _TILE_COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _TILE_COUNTERS[device] = torch.zeros(1 << 16, dtype=torch.int32, device=device)
    return _TILE_COUNTERS[device]


# the FMA GEMV's x prologues; SILU_AND_MUL_UNNORMED: silu(gate) * up of a norm launch's hand-off
PLAIN, SILU_AND_MUL, RMS_NORM, RMS_NORM_RESIDUAL, SILU_AND_MUL_UNNORMED = 0, 1, 2, 3, 4


def w4a16_silu_and_mul_gemv(gate_up: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                            zeros: torch.Tensor, group_size: int, g_idx: torch.Tensor | None,
                            handoff: torch.Tensor | None = None) -> torch.Tensor | None:
    """silu(gate) * up @ W for gate_up = [gate | up] [M, 2K] in one launch of the FMA GEMV
    where its tuned launch is the FMA one (else None: the caller runs the two). gate_up may be
    a norm launch's hand-off (w4a16_rms_norm_gemv): its rsqrt is applied here. `handoff`: see
    w4a16_gemv."""
    k = gate_up.shape[-1] // 2
    config = gemv_config(gate_up.shape[0], k, qweight.shape[1])
    unnormed = getattr(gate_up, "w4a16_unnormed", None)
    if (gate_up.dim() != 2 or gate_up.stride(1) != 1 or config is None or config.dot
            or not fast_gemv_fits(k, group_size, g_idx)):
        if unnormed is not None:
            raise RuntimeError("w4a16: a norm launch's hand-off reached a layer that cannot take it")
        return None
    return w4a16_gemv(gate_up[:, :k], qweight, scales, zeros, group_size, config,
                      prologue=SILU_AND_MUL if unnormed is None else SILU_AND_MUL_UNNORMED, handoff=handoff,
                      x_norm=unnormed)


def w4a16_rms_norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                        qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                        g_idx: torch.Tensor | None, handoff: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(RMSNorm(x + residual) @ W, x + residual) (without a residual: of x, and x) for one row
    in one launch of the FMA GEMV where its tuned launch is the FMA one and its K splits (if
    any) can be summed in the kernel; else None (the caller runs the norm, then the matmul).
    The normalised x is not rounded to x's dtype first (the unfused path rounds it twice).
    x may be an fp32 hand-off (with a residual). With `handoff` ([1, N + 1] fp32, zero) the
    output is the hand-off's first N: the sums before the rsqrt, which
    w4a16_silu_and_mul_gemv applies (the squares at [:, N]); the tensor says so
    (`w4a16_unnormed`: squares, 1 / K, eps), and nothing else may read it."""
    m, k = x.shape
    config = gemv_config(m, k, qweight.shape[1])
    if (m != 1 or not x.is_contiguous() or (residual is not None and not residual.is_contiguous())
            or config is None or config.dot or not fast_gemv_fits(k, group_size, g_idx)
            or (residual is None and x.dtype != scales.dtype)):
        return None
    h = x if residual is None else torch.empty_like(residual)
    n = qweight.shape[1]
    sums = squares = None
    if handoff is not None:
        sums, squares = handoff[:, :n], handoff[:, n]
    out = w4a16_gemv(x, qweight, scales, zeros, group_size, config, prologue=RMS_NORM if residual is None else
                     RMS_NORM_RESIDUAL, norm=(norm_weight, eps, residual, h), handoff=sums, handoff_squares=squares)
    if out is None:
        return None
    if handoff is not None:
        out.w4a16_unnormed = (squares, 1.0 / k, eps)
    return out, h


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, config: GemvConfig | None = None, prologue: int = PLAIN,
               norm: tuple | None = None, handoff: torch.Tensor | None = None,
               handoff_squares: torch.Tensor | None = None, x_norm: tuple | None = None) -> torch.Tensor | None:
    """x [M, K] (decode-sized) @ W through _w4_gemv_fma_kernel or _w4_gemv_kernel
    (fast_gemv_fits must hold); split K sums fp32 partials (in the FMA kernel, or by one
    more small kernel). `prologue` (FMA only; see _x_nibbles): SILU_AND_MUL, x is the gate half of
    [gate | up] (up right after it in each row); RMS_NORM / RMS_NORM_RESIDUAL with `norm` =
    (norm weight, eps, residual, h out); SILU_AND_MUL_UNNORMED with `x_norm` = (squares [M], 1 / K,
    eps) of the norm launch whose hand-off x is. None where a norm prologue's splits cannot be
    summed in the kernel (before the split-K counters exist).
    `handoff` (FMA only): an fp32 [M, N] that is zero; the programs add their sums into it and it is
    returned, unrounded (a norm prologue's squares into `handoff_squares` [M], its rsqrt left
    out): no fix-up at the end of the kernel. x may be fp32 (a hand-off) for the FMA launch."""
    m, k, n = _check(x, qweight, scales, zeros, group_size, None, fp32_x=True)
    if not fast_gemv_fits(k, group_size, None):
        raise ValueError(f"w4a16_gemv: needs K ({k}) and the group size ({group_size}) divisible by 128")
    config = config or gemv_config(m, k, n) or DOT_GEMV
    if (prologue != PLAIN or handoff is not None or x.dtype != scales.dtype) and config.dot:
        raise ValueError("w4a16_gemv: the prologues, hand-offs and fp32 x are the FMA launch's")
    block_m = config.block_m if config.dot else 1
    k_blocks = k // (128 if config.dot else 8 * config.words)
    n_blocks, m_blocks = triton.cdiv(n, config.block_n), triton.cdiv(m, block_m)
    if config.dot:
        splits, per_split, partials = split_k(x, n, k_blocks, n_blocks * m_blocks, config.programs_per_sm)
        _w4_gemv_kernel[(n_blocks, splits, m_blocks)](
            x, qweight, scales, zeros, partials, m, n, per_split, k_blocks,
            x.stride(0), qweight.stride(0), scales.stride(0), partials.stride(1), partials.stride(0),
            GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=config.block_n,
            IEEE=x.dtype == torch.float32, NUM_STAGES=config.num_stages, num_warps=config.num_warps)
        return sum_splits(partials, x.dtype)
    norm_weight, eps, residual, h = norm or (qweight, 0.0, None, None)
    xq, x_inv_k, x_eps = x_norm or (qweight, 0.0, 0.0)
    if handoff is not None:
        splits, per_split = split_count(x.device, k_blocks, n_blocks * m, config.programs_per_sm)
        y = partials = handoff
        counters, sums, squares = None, None, qweight if handoff_squares is None else handoff_squares
    else:
        splits, per_split, partials = split_k(x, n, k_blocks, n_blocks * m, config.programs_per_sm, scales.dtype)
        counters = _tile_counters(x.device) if splits > 1 and config.fixup and m * n_blocks <= (1 << 16) else None
        if splits > 1 and counters is None and prologue in (RMS_NORM, RMS_NORM_RESIDUAL):
            return None
        y = partials if counters is None else torch.empty((m, n), dtype=scales.dtype, device=x.device)
        squares = (torch.empty((splits, m), dtype=torch.float32, device=x.device)
                   if prologue in (RMS_NORM, RMS_NORM_RESIDUAL) else qweight)
        sums = _zero_sums(x.device, m * n) if config.atomic and counters is not None and m * n_blocks <= _SQUARES else None
        if sums is not None:
            partials, squares = sums, sums[-_SQUARES:]
    _w4_gemv_fma_kernel[(n_blocks, splits, m)](
        x, qweight, scales, zeros, y, partials, qweight if counters is None else counters, n, per_split,
        k_blocks, x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0) if handoff is not None else n,
        k if prologue in (SILU_AND_MUL, SILU_AND_MUL_UNNORMED) else 0,
        qweight if residual is None else residual, qweight if h is None else h, norm_weight, squares, eps,
        xq, x_inv_k, x_eps,
        GROUP_SIZE=group_size, BLOCK_N=config.block_n, WORDS=config.words, EVEN_N=n % config.block_n == 0,
        SPLIT=counters is not None, PROLOGUE=prologue, NUM_STAGES=1 if config.prefetch else config.num_stages,
        ATOMIC=sums is not None, SPLITS=splits if counters is not None and sums is None else 1,
        PREFETCH=config.prefetch, EVICT=config.evict, HANDOFF=handoff is not None, num_warps=config.num_warps)
    if handoff is not None:
        return handoff
    return sum_splits(partials, scales.dtype) if counters is None else y
