"""One launch per layer for an all-decode batch (every sequence has one new token): rotary of
the token's query and key, its K/V into the paged cache, attention over the cache, and the
split-K merge, where the generic path launches three kernels (rotary_store_kv, the paged
kernel, _reduce_segments). At batch 1 the work is a few hundred KB and each launch is latency:
on an H200 the three took 9.6 us a layer of llama-1b, this one 8.4 (benchmarks/RESULTS.md).

Grid: (num_seqs, num_kv_heads, num_segments). Token s is sequence s's, at position
seq_lens[s] - 1 (all-decode: no query_start_loc or positions loads, so the first dependent
load is seq_len). A program packs the QUERIES_PER_KV query heads of one KV head into the rows
of a BLOCK_M tile (as the paged kernel) and:

1. loads and rotates (ROTARY) the token's query rows and key head, rounded as
   layers/triton_ops.rotate rounds them (the cos/sin caches have duplicated halves, so one
   full-width load of the row and one of its half-rotated copy give both halves);
2. segment 0 stores the rotated key and the value into the token's slot (-1: none); nobody
   in this launch reads that slot back: the cached keys [0, seq_len - 1) come through the
   block table, and in the tile that holds position seq_len - 1 the new key and value stand
   in for the slot from registers;
3. the key tiles [0, cdiv(seq_len, TILE_N)) are split over segments as the paged kernel
   splits them (triton_paged_attention._active_segments: one segment for a short context,
   which writes the output directly); with more than one active segment each writes fp32
   partials, and the last one to finish (an atomic counter per (token, KV head), reset by
   that program) merges them with the paged kernel's merge (merge_segments). No second launch.

Numerics: bit for bit the generic path (rotary_store_kv, paged_attention and its reduce): the
same roundings, tiles, segments and merge order. Session 5's version scored the new key apart
(first, its weight unrounded) and split the tiles otherwise: one-at-a-time bf16 agreement with
transformers on the default model 23/40 against the generic path's 30/40 (H200, 2026-12-01).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.attention.triton_paged_attention import (_LOG2E, SplitPlan, _active_segments,
                                                          _check_attention_inputs, _load_kv_tile,
                                                          _online_softmax_step, _sm_count, choose_splits,
                                                          default_tile_config, merge_segments)
from pagedserve.layers import triton_gemv
from pagedserve.layers.triton_gemv import gdc_launch_dependents, gdc_wait
from pagedserve.layers.triton_ops import _LIBDEVICE, libdevice, zeroed_counters

@triton.jit
def _rotate_row(x, x_other, cos, sin, first_half, LIBDEVICE: tl.constexpr):
    """Rotate-half rotary of full-width rows: x_other is x with its halves swapped; rounded
    as layers/triton_ops.rotate (each product to the input dtype, then the sum)."""
    dt = x.dtype
    a = x.to(tl.float32)
    b = x_other.to(tl.float32)
    if LIBDEVICE:
        a = libdevice.mul_rn(a, cos).to(dt).to(tl.float32)
        b = libdevice.mul_rn(b, sin).to(dt).to(tl.float32)
        out = tl.where(first_half, libdevice.sub_rn(a, b), libdevice.add_rn(a, b))
    else:
        a = (a * cos).to(dt).to(tl.float32)
        b = (b * sin).to(dt).to(tl.float32)
        out = tl.where(first_half, a - b, a + b)
    return out.to(dt)


@triton.jit(do_not_specialize=["num_segments", "tiles_per_segment", "short_tiles", "lone_tiles",
                               "stride_block_table"])
def _decode_attention_kernel(
    out_ptr, partial_acc_ptr, partial_max_ptr, partial_sum_ptr, counter_ptr,
    query_ptr, key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    slot_mapping_ptr, cos_ptr, sin_ptr,
    scale_log2, num_segments, tiles_per_segment, short_tiles, lone_tiles,
    stride_q_token, stride_q_head, stride_key_token, stride_key_head, stride_value_token, stride_value_head,
    stride_o_token, stride_o_head,
    stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head,
    stride_block_table, stride_cos,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, QUERIES_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, ROTARY: tl.constexpr, LIBDEVICE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:   # launched early (programmatic dependent launch): the qkv gemv's output first
        gdc_wait()
        gdc_launch_dependents()   # the o projection's programs may be placed (and prefetch) now
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    token = seq.to(tl.int64)   # an all-decode batch: token s is sequence s's, at position seq_len - 1
    seq_len = tl.load(seq_lens_ptr + seq)
    cached = seq_len - 1   # keys before the new token's
    num_tiles = tl.cdiv(seq_len, TILE_N)   # the new key's tile included, as the paged kernel counts them
    active = _active_segments(num_tiles, num_segments, tiles_per_segment, short_tiles, lone_tiles)
    if segment >= active:
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, TILE_N)
    head = kv_head * QUERIES_PER_KV + offs_m
    row_valid = offs_m < QUERIES_PER_KV
    dim_valid = offs_d < HEAD_DIM
    q_mask = row_valid[:, None] & dim_valid[None, :]
    q_rows = query_ptr + token * stride_q_token + head[:, None] * stride_q_head
    q = tl.load(q_rows + offs_d[None, :], mask=q_mask, other=0.0)
    k_new_ptr = key_ptr + token * stride_key_token + kv_head * stride_key_head
    k_new = tl.load(k_new_ptr + offs_d, mask=dim_valid, other=0.0)
    v_new = tl.load(value_ptr + token * stride_value_token + kv_head * stride_value_head + offs_d,
                    mask=dim_valid, other=0.0)
    if ROTARY:   # HEAD_DIM is a power of two (== HEAD_DIM_PAD)
        swapped = (offs_d + HALF) % HEAD_DIM
        pos = cached.to(tl.int64)   # no positions load: one dependent round trip fewer
        cos = tl.load(cos_ptr + pos * stride_cos + offs_d).to(tl.float32)
        sin = tl.load(sin_ptr + pos * stride_cos + offs_d).to(tl.float32)
        first_half = offs_d < HALF
        q = _rotate_row(q, tl.load(q_rows + swapped[None, :], mask=q_mask, other=0.0), cos[None, :],
                        sin[None, :], first_half[None, :], LIBDEVICE)
        k_new = _rotate_row(k_new, tl.load(k_new_ptr + swapped), cos, sin, first_half, LIBDEVICE)
    if segment == 0:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:
            block = slot // BLOCK_SIZE
            tl.store(k_cache_ptr + block * stride_k_block + (slot % BLOCK_SIZE) * stride_k_slot
                     + kv_head * stride_k_head + offs_d, k_new.to(k_cache_ptr.dtype.element_ty), mask=dim_valid)
            tl.store(v_cache_ptr + block * stride_v_block + (slot % BLOCK_SIZE) * stride_v_slot
                     + kv_head * stride_v_head + offs_d, v_new.to(v_cache_ptr.dtype.element_ty), mask=dim_valid)
    # the new key and value as the cache holds them: they stand in for its slot in the last tile
    k_new = k_new.to(k_cache_ptr.dtype.element_ty)
    v_new = v_new.to(v_cache_ptr.dtype.element_ty)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_block_table
    k_head_ptr = k_cache_ptr + kv_head.to(tl.int64) * stride_k_head
    v_head_ptr = v_cache_ptr + kv_head.to(tl.int64) * stride_v_head
    q = q.to(k_cache_ptr.dtype.element_ty)
    tile_lo = segment * num_tiles // active
    tile_hi = (segment + 1) * num_tiles // active
    key_pos = tile_lo * TILE_N + offs_n
    block_id = tl.load(block_table_row + key_pos // BLOCK_SIZE, mask=key_pos < cached, other=0).to(tl.int64)
    for tile in range(tile_lo, tile_hi):
        key_pos = tile * TILE_N + offs_n
        k, v = _load_kv_tile(k_head_ptr, v_head_ptr, block_id, key_pos, key_pos < cached, offs_d, dim_valid,
                             stride_k_block, stride_k_slot, stride_v_block, stride_v_slot, BLOCK_SIZE)
        is_new = (key_pos == cached)[:, None]   # not read back: segment 0 may be storing it
        k = tl.where(is_new, k_new[None, :], k)
        v = tl.where(is_new, v_new[None, :], v)
        next_pos = key_pos + TILE_N
        block_id = tl.load(block_table_row + next_pos // BLOCK_SIZE, mask=next_pos < cached,
                           other=0).to(tl.int64)
        m_i, l_i, acc = _online_softmax_step(q, k, v, (key_pos < seq_len)[None, :], m_i, l_i, acc, scale_log2,
                                             DOT_PRECISION)

    out_ptrs = out_ptr + token * stride_o_token + head[:, None] * stride_o_head + offs_d[None, :]
    if active == 1:   # as the paged kernel's one segment (its merge of one segment divides alike)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        rows = (token * NUM_HEADS + head) * num_segments   # + segment: this program's partial rows
        tl.store(partial_acc_ptr + (rows + segment)[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=q_mask)
        tl.store(partial_max_ptr + rows + segment, m_i, mask=row_valid)
        tl.store(partial_sum_ptr + rows + segment, l_i, mask=row_valid)
        tl.debug_barrier()   # every thread's partials are written before the counter is released
        counter = counter_ptr + token * NUM_KV_HEADS + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == active - 1:   # the last one merges
            for r in tl.static_range(QUERIES_PER_KV):   # each head as the paged kernel's reduce merges it
                merge_head = kv_head * QUERIES_PER_KV + r
                merge_segments(out_ptr + token * stride_o_token + merge_head * stride_o_head, partial_acc_ptr,
                               partial_max_ptr, partial_sum_ptr, (token * NUM_HEADS + merge_head) * num_segments,
                               active, HEAD_DIM, HEAD_DIM_PAD, 16)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")   # ready for the next launch


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     slot_mapping: torch.Tensor, scale: float, max_seq_len: int,
                     rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                     out: torch.Tensor | None = None, *, num_splits: int | SplitPlan | None = None,
                     tiles_per_segment: int | None = None) -> torch.Tensor:
    """Attention of an all-decode batch: token s is sequence s's new token, at position
    seq_lens[s] - 1 (padding rows as the decode graphs pad them: seq_len 1, slot -1), storing
    the new K/V first. query [T, Hq, D], key / value [T, Hkv, D] (views with any token and
    head strides); rotary = (cos_cache, sin_cache) rotates query and key at that position as
    rotary_store_kv does (query and key themselves are not modified). Mutates k_cache /
    v_cache (the tokens' slots) and `out`; never synchronises with the device (graph-safe:
    max_seq_len is a host upper bound that fixes the split count). num_splits as
    paged_attention's (None: choose_splits; bit for bit its output given the same). tiles_per_segment:
    None keeps the plan's rule, else that many key tiles a segment at every context (timings, tests)."""
    _check_attention_inputs(query, k_cache, v_cache, block_tables, seq_lens, None, out)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    if key.shape != (num_tokens, num_kv_heads, head_dim) or value.shape != key.shape \
            or key.stride(-1) != 1 or value.stride(-1) != 1 or key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"key/value must be [T, Hkv, D] = {(num_tokens, num_kv_heads, head_dim)} of the query's "
                         f"dtype with a contiguous last dim; got {tuple(key.shape)}, {tuple(value.shape)}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.stride(0) != 1 or seq_lens.shape != (num_tokens,):
        raise ValueError(f"slot_mapping and seq_lens must be [num_tokens={num_tokens}] (one token a sequence), "
                         f"slot_mapping contiguous; got {tuple(slot_mapping.shape)}, {tuple(seq_lens.shape)}")
    if rotary is not None:
        cos_cache, sin_cache = rotary
        if head_dim & (head_dim - 1) or cos_cache.shape[-1] != head_dim or sin_cache.stride() != cos_cache.stride() \
                or cos_cache.stride(-1) != 1:
            raise ValueError("decode_attention: rotary needs a power-of-two head_dim and [max_pos, head_dim] "
                             "cos/sin caches of one layout")
    else:
        cos_cache, sin_cache = query, query   # unused (ROTARY=False)
    if out is None:
        out = torch.empty_like(query)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0:
        return out
    queries_per_kv, head_dim_pad = num_heads // num_kv_heads, triton.next_power_of_2(head_dim)
    config = default_tile_config(queries_per_kv, head_dim_pad, 1, query.dtype)
    if num_splits is None:
        plan = choose_splits(num_seqs, num_kv_heads, 1, max_seq_len, config.tile_n, _sm_count(query.device),
                             num_heads, head_dim_pad)
    else:
        plan = num_splits if isinstance(num_splits, SplitPlan) else SplitPlan(num_splits)
    if tiles_per_segment is not None:
        plan = SplitPlan(plan.num_segments, tiles_per_segment, 0, 0)
    counters = zeroed_counters(query.device, num_tokens * num_kv_heads) if plan.num_segments > 1 else None
    if counters is None:
        plan = SplitPlan(1)
        counters = slot_mapping   # unused
    num_splits = plan.num_segments
    partial_acc = partial_max = partial_sum = out   # unused at one split
    if num_splits > 1:
        rows = num_tokens * num_heads * num_splits
        partial_acc = torch.empty(rows, head_dim_pad, dtype=torch.float32, device=query.device)
        partial_max = torch.empty(rows, dtype=torch.float32, device=query.device)
        partial_sum = torch.empty(rows, dtype=torch.float32, device=query.device)
    _decode_attention_kernel[(num_seqs, num_kv_heads, num_splits)](
        out, partial_acc, partial_max, partial_sum, counters,
        query, key, value, k_cache, v_cache, block_tables, seq_lens, slot_mapping, cos_cache, sin_cache,
        scale * _LOG2E, *plan.args(),
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_tables.stride(0), cos_cache.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, QUERIES_PER_KV=queries_per_kv,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, HALF=head_dim // 2, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=config.block_m, TILE_N=config.tile_n, ROTARY=rotary is not None, LIBDEVICE=_LIBDEVICE,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
        **(dict(PDL=True, launch_pdl=True) if triton_gemv.PDL and query.is_cuda else dict(PDL=False)),
    )
    return out
