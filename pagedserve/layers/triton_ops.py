"""Fused elementwise kernels for CUDA: RMSNorm (with the residual add), SiLU-and-mul, and
rotary embedding applied in place. Each kernel sits beside a thin launcher that checks
shapes, dtypes and strides; the torch layers call these only for CUDA tensors.

Arithmetic follows transformers' rounding points, so that bf16 / fp16 outputs match the
torch ops bit for bit where the order of a reduction allows it:
- RMSNorm: the sum of squares in fp64 (exact for 16-bit rows, so independent of the order of
  the sum: triton_gemv's norm chain gathers it across programs), the mean and 1/rms in fp32
  (sum * (1/n) + eps, as torch's mean kernel), the normalised row cast to the input dtype
  before the weight multiply (LlamaRMSNorm);
- SiLU: x / (1 + exp(-x)) in fp32 with IEEE exp and division (torch's silu kernel), rounded,
  then the product with `up` rounded;
- rotary: q*cos and rotate_half(q)*sin each rounded to the input dtype, then their sum
  (transformers' apply_rotary_pos_emb runs three ops in the input dtype); the products and
  sums are libdevice's explicitly rounded ops, which the compiler never contracts into an
  FMA past the rounding (plain ones it does: off by an ulp in ~20% of elements on the H100;
  `enable_fp_fusion=False` would also do, but costs ~150 us per launch in Triton 3.6).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Triton's CPU interpreter (CI) has no libdevice: plain ops stand in for its IEEE ones there.
_LIBDEVICE = os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def rms_inv(sum_sq, inv_n, eps):
    """1 / rms from a row's sum of squares, summed in fp64: the squares of 16-bit values are exact
    there and so is their sum, in any order, while it spans fewer than ~37 binades; so a sum
    gathered across a gemv's programs (triton_gemv's norm chain) gives the norm kernel's bits."""
    return tl.rsqrt(tl.fma(sum_sq.to(tl.float32), inv_n, eps))


@triton.jit
def rms_apply(x, inv, weight):
    """LlamaRMSNorm's two rounding points: x * 1/rms, then times the weight."""
    normed = (x.to(tl.float32) * inv).to(x.dtype)
    return (normed * weight).to(x.dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, x_stride, res_stride, out_stride, n_cols, inv_n, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    # the weight's load issued with the row's, not after the sum: no load moves across the
    # reduction's barrier, so there it was one more round trip to memory after the statistic
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + row * res_stride + cols, mask=mask, other=0.0)
        tl.store(residual_ptr + row * res_stride + cols, x, mask=mask)
    xd = x.to(tl.float64)
    inv = rms_inv(tl.sum(xd * xd, axis=0), inv_n, eps)
    tl.store(out_ptr + row * out_stride + cols, rms_apply(x, inv, weight), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor:
    """x [rows, hidden] -> normalised rows. With `residual`: x + residual is written back
    into `residual` (in place) and normalised."""
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm: x must be 2-D with unit column stride and weight [{x.shape[-1]}]; "
                         f"got x {tuple(x.shape)} strides {x.stride()}, weight {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(1) != 1 or residual.dtype != x.dtype):
        raise ValueError("rms_norm: residual must match x in shape and dtype with unit column stride")
    out = torch.empty_like(x)
    block = triton.next_power_of_2(x.shape[1])
    _rms_norm_kernel[(x.shape[0],)](x, residual if residual is not None else x, weight, out, x.stride(0),
                                    residual.stride(0) if residual is not None else 0, out.stride(0), x.shape[1],
                                    1.0 / x.shape[1], eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                                    num_warps=min(max(block // 256, 1), 8))
    return out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, n_cols, BLOCK: tl.constexpr,
                         LIBDEVICE: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_stride + n_cols + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * out_stride + cols, silu_mul(gate, up, LIBDEVICE), mask=mask)


@triton.jit
def silu_mul(gate, up, LIBDEVICE: tl.constexpr):
    """silu(gate) * up as torch rounds it (also the down gemv's prologue: layers/triton_gemv.py)."""
    g = gate.to(tl.float32)
    if LIBDEVICE:
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    return tl.div_rn(g, 1.0 + e).to(up.dtype) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [rows, 2 * d] = [gate | up] -> silu(gate) * up, [rows, d]."""
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"silu_and_mul: x must be [rows, 2*d] with unit column stride, got {tuple(x.shape)}")
    d = x.shape[1] // 2
    out = torch.empty((x.shape[0], d), dtype=x.dtype, device=x.device)
    block = 1024
    _silu_and_mul_kernel[(x.shape[0], triton.cdiv(d, block))](x, out, x.stride(0), out.stride(0), d, BLOCK=block,
                                                                     LIBDEVICE=_LIBDEVICE)
    return out


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr, q_stride_t, q_stride_h, k_stride_t, k_stride_h,
                   cache_stride, num_q_heads, num_k_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                   LIBDEVICE: tl.constexpr):
    token = tl.program_id(0)
    pos = tl.load(pos_ptr + token)
    offs = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * cache_stride + offs).to(tl.float32)
    sin = tl.load(sin_ptr + pos * cache_stride + offs).to(tl.float32)
    heads = tl.arange(0, BLOCK_H)
    for which in tl.static_range(2):
        if which == 0:
            base, stride_t, stride_h, n_heads = q_ptr, q_stride_t, q_stride_h, num_q_heads
        else:
            base, stride_t, stride_h, n_heads = k_ptr, k_stride_t, k_stride_h, num_k_heads
        ptr = base + token * stride_t + heads[:, None] * stride_h + offs[None, :]
        mask = heads[:, None] < n_heads
        x1 = tl.load(ptr, mask=mask, other=0.0)
        x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
        out1, out2 = rotate(x1, x2, cos[None, :], sin[None, :], LIBDEVICE)
        tl.store(ptr, out1, mask=mask)
        tl.store(ptr + HALF, out2, mask=mask)


@triton.jit
def rotate(x1, x2, cos, sin, LIBDEVICE: tl.constexpr):
    """Rotate-half rotary of the halves x1, x2 (input dtype) by fp32 cos / sin, rounded as
    transformers rounds it (also the KV store's: attention/triton_store_kv.py)."""
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    dt = x1.dtype   # each product rounded to the input dtype, then the sum (transformers)
    if LIBDEVICE:   # explicitly rounded ops: never contracted into an FMA past the rounding
        a = libdevice.mul_rn(x1f, cos).to(dt).to(tl.float32)
        b = libdevice.mul_rn(x2f, sin).to(dt).to(tl.float32)
        c = libdevice.mul_rn(x2f, cos).to(dt).to(tl.float32)
        d = libdevice.mul_rn(x1f, sin).to(dt).to(tl.float32)
        out1, out2 = libdevice.sub_rn(a, b), libdevice.add_rn(c, d)
    else:
        out1 = (x1f * cos).to(dt).to(tl.float32) - (x2f * sin).to(dt).to(tl.float32)
        out2 = (x2f * cos).to(dt).to(tl.float32) + (x1f * sin).to(dt).to(tl.float32)
    return out1.to(dt), out2.to(dt)


@triton.jit
def rotate_rows(x, partner, cos, sin, sign, LIBDEVICE: tl.constexpr):
    """rotate() on whole rows at once: element d is x[d] * cos[d] + sign[d] * partner[d] * sin[d],
    where partner[d] = x[d ^ half] and sign is -1 on the first half (cos / sin duplicated over the
    halves), each product rounded as rotate() rounds it; returns x's dtype."""
    xf, pf = x.to(tl.float32), partner.to(tl.float32)
    dt = x.dtype
    if LIBDEVICE:   # a - b and a + (-b) are the same IEEE operation
        a = libdevice.mul_rn(xf, cos).to(dt).to(tl.float32)
        b = libdevice.mul_rn(pf, sin).to(dt).to(tl.float32)
        out = libdevice.add_rn(a, sign * b)
    else:
        out = (xf * cos).to(dt).to(tl.float32) + sign * (pf * sin).to(dt).to(tl.float32)
    return out.to(dt)


def rotary_in_place(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_cache: torch.Tensor,
                    sin_cache: torch.Tensor) -> None:
    """Rotate query [T, Hq, D] and key [T, Hk, D] (views allowed: unit stride on D) in place;
    cos/sin caches are [max_position, D] with duplicated halves (rotate-half layout)."""
    head_dim = query.shape[-1]
    if query.dim() != 3 or key.dim() != 3 or key.shape[-1] != head_dim or query.stride(2) != 1 \
            or key.stride(2) != 1 or head_dim & (head_dim - 1):
        raise ValueError(f"rotary: query/key must be [T, H, D] with unit stride on a power-of-two D; "
                         f"got {tuple(query.shape)} {tuple(key.shape)}")
    if cos_cache.shape[-1] != head_dim or positions.shape[0] != query.shape[0]:
        raise ValueError("rotary: cos/sin cache or positions do not match query")
    block_h = triton.next_power_of_2(max(query.shape[1], key.shape[1]))
    _rotary_kernel[(query.shape[0],)](query, key, cos_cache, sin_cache, positions, query.stride(0), query.stride(1),
                                      key.stride(0), key.stride(1), cos_cache.stride(0), query.shape[1],
                                      key.shape[1], HALF=head_dim // 2, BLOCK_H=block_h, LIBDEVICE=_LIBDEVICE)


@functools.lru_cache(maxsize=None)
def _counter_holder(device: torch.device) -> list[torch.Tensor]:
    return [torch.zeros(0, dtype=torch.int32, device=device)]


def zeroed_counters(device: torch.device, size: int) -> torch.Tensor | None:
    """A per-device int32 buffer of at least `size` zeros for kernels whose programs count
    their arrivals (the last one merges, then resets its counter: every launch leaves it
    zeroed; launches on one stream never overlap). Grown outside CUDA-graph capture only:
    None while capturing (the caller then takes a path without counters)."""
    holder = _counter_holder(device)
    if holder[-1].numel() < size:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        # a larger buffer joins the list: CUDA graphs captured with a smaller one still use it
        holder.append(torch.zeros(max(size, 1 << 16), dtype=torch.int32, device=device))
    return holder[-1]


# mask_stride: the grammar's bitmask words a row (its vocabulary / 32), not the model's: one
# specialisation for any, the one start-up's dry run compiles (worker/profile_run.py)
@triton.jit(do_not_specialize=["num_splits", "mask_stride"])
def _argmax_kernel(x_ptr, part_val_ptr, part_idx_ptr, counter_ptr, out_ptr, n_cols, stride_row, num_splits,
                   cols_per_split, mask_ptr, mask_stride, BLOCK: tl.constexpr, SPLITS_PAD: tl.constexpr,
                   HAS_MASK: tl.constexpr):
    """Program (row, split) scans its slice of the row lane-wise (a lane keeps its first
    maximum), reduces to (max, first index); the last split to arrive merges the row.
    HAS_MASK: column c of row r counts as -inf unless bit c % 32 of word c // 32 of the
    mask's row r is set (xgrammar's token bitmask layout)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    start = split * cols_per_split
    offs = tl.arange(0, BLOCK)
    base = x_ptr + row.to(tl.int64) * stride_row
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_idx = start + offs
    for col in range(start, tl.minimum(start + cols_per_split, n_cols), BLOCK):
        x = tl.load(base + col + offs, mask=col + offs < n_cols, other=float("-inf")).to(tl.float32)
        x = tl.where(x != x, float("inf"), x)   # NaN counts as the largest (torch.argmax)
        if HAS_MASK:   # a masked-out column is -inf (NaN included), as xgrammar's in-place kernel leaves it
            cols = col + offs
            words = tl.load(mask_ptr + row * mask_stride + (cols >> 5), mask=cols < n_cols, other=0)
            x = tl.where(((words >> (cols & 31)) & 1) != 0, x, float("-inf"))
        better = x > best
        best_idx = tl.where(better, col + offs, best_idx)
        best = tl.where(better, x, best)
    top = tl.max(best, 0)
    tl.store(part_val_ptr + row * num_splits + split, top)
    tl.store(part_idx_ptr + row * num_splits + split, tl.min(tl.where(best == top, best_idx, n_cols), 0))
    tl.debug_barrier()   # the partials are written before the arrival is counted
    if tl.atomic_add(counter_ptr + row, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
        splits = tl.arange(0, SPLITS_PAD)
        valid = splits < num_splits
        vals = tl.load(part_val_ptr + row * num_splits + splits, mask=valid, other=float("-inf"),
                       cache_modifier=".cg")
        idxs = tl.load(part_idx_ptr + row * num_splits + splits, mask=valid, other=n_cols, cache_modifier=".cg")
        top = tl.max(vals, 0)
        tl.store(out_ptr + row, tl.min(tl.where(vals == top, idxs, n_cols), 0).to(tl.int64))
        tl.atomic_xchg(counter_ptr + row, 0, sem="relaxed", scope="gpu")


ARGMAX_BLOCK = 1024
ARGMAX_MAX_SPLITS = 64
# rows x splits a launch aims at: a row alone keeps up to 64 programs (3.5 us over 128,256 columns
# on an H200), many rows fewer, longer ones; 64 a row at every row count was 52.6 us at 410 rows, this
# 34.2 (benchmarks/argmax_sweep.py; RESULTS.md, session 31)
ARGMAX_PROGRAMS = 1024


def argmax_splits(rows: int, n: int) -> int:
    """How many programs scan one row of `n` columns when `rows` rows go in one launch: enough for
    ~ARGMAX_PROGRAMS programs in all (a row alone: up to ARGMAX_MAX_SPLITS), each at least two
    ARGMAX_BLOCK iterations (argmax_rows then drops any split left empty)."""
    return max(1, min(ARGMAX_MAX_SPLITS, triton.cdiv(n, 2 * ARGMAX_BLOCK), triton.cdiv(ARGMAX_PROGRAMS, max(rows, 1))))


def argmax_rows(x: torch.Tensor, bitmask: torch.Tensor | None = None, out: torch.Tensor | None = None,
                splits: int | None = None) -> torch.Tensor:
    """x [rows, n] (unit column stride) -> int64 [rows]: each row's first maximum, NaN the
    largest, as torch.argmax(dim=-1). One launch: a row's slices scanned by up to
    ARGMAX_MAX_SPLITS programs, merged by the last to finish (torch's reduce over one row of
    a 128k vocabulary took 37 us per decode step on an H200: benchmarks/decode_gpu.py).
    `bitmask` (int32 [rows, >= ceil(n / 32)] on x's device, unit column stride): the argmax
    of x with the columns whose bit is 0 set to -inf (a structured-outputs grammar's mask,
    read here instead of written into x by a launch of its own). `out`: an int64 [rows] tensor
    written instead of a new one (a decode CUDA graph's static sampled ids). `splits`: programs a
    row (1 to ARGMAX_MAX_SPLITS; default argmax_splits(rows, n): benchmarks/argmax_sweep.py)."""
    if x.dim() != 2 or x.stride(1) != 1 or x.shape[1] == 0 or x.shape[1] >= 2**31 - 1:
        raise ValueError(f"argmax_rows: x must be [rows, n > 0] with unit column stride; got {tuple(x.shape)} "
                         f"strides {x.stride()}")
    rows, n = x.shape
    if bitmask is not None and (bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.shape[0] != rows
                                or bitmask.shape[1] * 32 < n or bitmask.stride(1) != 1):
        raise ValueError(f"argmax_rows: bitmask must be int32 [{rows}, >= {-(-n // 32)}] with unit column stride; "
                         f"got {bitmask.dtype} {tuple(bitmask.shape)}")
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=x.device)
    elif out.dtype != torch.int64 or out.shape != (rows,) or out.device != x.device:
        raise ValueError(f"argmax_rows: out must be int64 [{rows}] on {x.device}; got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    if rows == 0:
        return out
    counters = zeroed_counters(x.device, rows)
    if counters is None:
        if bitmask is not None:
            raise ValueError("argmax_rows: a bitmask cannot be read while a CUDA graph is captured")
        return torch.argmax(x, dim=-1, out=out)
    if splits is None:
        splits = argmax_splits(rows, n)
    elif not 1 <= splits <= ARGMAX_MAX_SPLITS:
        raise ValueError(f"argmax_rows: splits must be in [1, {ARGMAX_MAX_SPLITS}]; got {splits}")
    cols_per_split = triton.cdiv(triton.cdiv(n, splits), ARGMAX_BLOCK) * ARGMAX_BLOCK
    splits = triton.cdiv(n, cols_per_split)   # every split non-empty
    part_val = torch.empty(rows * splits, dtype=torch.float32, device=x.device)
    part_idx = torch.empty(rows * splits, dtype=torch.int32, device=x.device)
    _argmax_kernel[(rows, splits)](x, part_val, part_idx, counters, out, n, x.stride(0), splits, cols_per_split,
                                   x if bitmask is None else bitmask, 0 if bitmask is None else bitmask.stride(0),
                                   BLOCK=ARGMAX_BLOCK, SPLITS_PAD=ARGMAX_MAX_SPLITS,   # one compile for any split
                                   HAS_MASK=bitmask is not None, num_warps=4)
    return out


@triton.jit
def _embed_row_kernel(ids_ptr, weight_ptr, out_ptr, sums_ptr, vocab, n_cols, num_sums, stride_w,
                      BLOCK: tl.constexpr, SUMS_BLOCK: tl.constexpr):
    token = tl.load(ids_ptr)
    token = tl.minimum(tl.maximum(token, 0), vocab - 1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(weight_ptr + token * stride_w + cols, mask=mask, other=0.0)
    tl.store(out_ptr + cols, x, mask=mask)
    xd = x.to(tl.float64)
    offs = tl.arange(0, SUMS_BLOCK)
    tl.store(sums_ptr + offs, tl.where(offs == 0, tl.sum(xd * xd, axis=0), 0.0), mask=offs < num_sums)


def embed_row(ids: torch.Tensor, weight: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """weight's row of the one token id in `ids` ([1], int64 / int32; clamped into the vocabulary) as a
    new [1, H] row, and `sums` (fp64 [n]) set to that row's sum of squares at [0], zero elsewhere:
    the norm chain's first launch (models/llama.py's forward_chained), in place of the embedding
    lookup, the sums' memset and the first RMSNorm launch (the first qkv gemv normalises the row
    from sums[0], as the norm kernel does: the same bits)."""
    if ids.shape != (1,) or ids.dtype not in (torch.int64, torch.int32) or weight.dim() != 2 or weight.stride(1) != 1 \
            or sums.dtype != torch.float64 or sums.dim() != 1 or not sums.is_contiguous():
        raise ValueError(f"embed_row: ids int64 / int32 [1], weight [V, H] with unit column stride, sums fp64 [n]; got "
                         f"{ids.dtype} {tuple(ids.shape)}, {tuple(weight.shape)}, {sums.dtype} {tuple(sums.shape)}")
    out = torch.empty(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    block = triton.next_power_of_2(weight.shape[1])
    _embed_row_kernel[(1,)](ids, weight, out, sums, weight.shape[0], weight.shape[1], sums.shape[0], weight.stride(0),
                            BLOCK=block, SUMS_BLOCK=triton.next_power_of_2(sums.shape[0]),
                            num_warps=min(max(block // 256, 1), 8))
    return out


@triton.jit
def _feed_tokens_kernel(ids_ptr, feed_ptr, sampled_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    src = tl.load(feed_ptr + offs, mask=offs < n, other=-1)
    fed = src >= 0
    tl.store(ids_ptr + offs, tl.load(sampled_ptr + src, mask=fed, other=0), mask=fed)


def feed_tokens(ids: torch.Tensor, feed: torch.Tensor, sampled: torch.Tensor) -> None:
    """ids[i] = sampled[feed[i]] where feed[i] >= 0, in place (ids, sampled int64; feed int32,
    as long as ids): a decode CUDA graph's first launch, which takes the tokens the previous
    step sampled on the device into its input ids (worker/cuda_graph.py). On the CPU, torch."""
    if ids.dtype != torch.int64 or sampled.dtype != torch.int64 or feed.dtype != torch.int32 \
            or feed.shape != ids.shape or ids.dim() != 1:
        raise ValueError(f"feed_tokens: ids int64 [n], feed int32 [n], sampled int64; got {ids.dtype} "
                         f"{tuple(ids.shape)}, {feed.dtype} {tuple(feed.shape)}, {sampled.dtype}")
    n = ids.shape[0]
    if n == 0:
        return
    if not ids.is_cuda:
        fed = feed >= 0
        ids.copy_(torch.where(fed, sampled[feed.clamp(min=0).long()], ids))
        return
    block = min(1024, triton.next_power_of_2(n))
    _feed_tokens_kernel[(triton.cdiv(n, block),)](ids, feed, sampled, n, BLOCK=block, num_warps=1 if block <= 256 else 4)
