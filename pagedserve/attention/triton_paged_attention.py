"""Triton paged attention for a ragged mixed batch (prefill chunks and decodes in one call).

Grid: (query tiles, num_kv_heads, num_segments), or for decode launches (num_kv_heads, sequences,
num_segments): HEADS_FIRST, a sequence's heads adjacent in launch order. A query tile packs BLOCK_Q consecutive
tokens of ONE sequence times the QUERIES_PER_KV query heads that share the program's KV
head, so every K/V tile is loaded once per KV head (GQA packing):

    tile row m  ->  token  q_block * BLOCK_Q + m // QUERIES_PER_KV   (of its sequence)
                    head   kv_head * QUERIES_PER_KV + m % QUERIES_PER_KV

Query tiles are numbered per sequence without a host sync: sequence s owns the tiles
[(qsl[s] - qsl[begin]) // BLOCK_Q + (s - begin), ...) and a program finds its sequence by
binary search over query_start_loc (qsl); surplus programs exit at once.

Keys of sequence s live at positions [0, seq_len); the query token j of a chunk of length
query_len sits at position context_len + j (context_len = seq_len - query_len) and sees
keys <= its position. Keys are read TILE_N at a time through the block table:

    key position p -> k_cache[block_tables[s, p // BLOCK_SIZE], p % BLOCK_SIZE, kv_head, :]

Split-K (flash-decoding): with num_segments > 1 the first `active_segments` programs (a
SplitPlan's rule, chosen by split_plan.choose_splits) each cover one slice of the key tiles and write
un-normalised partials (acc, running max, running sum) in fp32 plus the token's count of
active segments; the others exit at once; triton_segment_merge.py merges the active ones (or, with
MERGE_IN_KERNEL, the last of a token's KV-head group to finish does, in the same launch). A
token with one active segment gets its output from it directly (the merge of one segment
divides alike). Softmax runs in fp32 in the log2 domain. Decode launches can also rotate the
query and the new key and store the new K/V themselves (paged_attention's rotary_store); the
latency-bound ones are then programmatic dependent launches (DECODE_PDL, WAIT_INPUTS): what the
projection before them does not write is read before griddepcontrol.wait, the query, key and
value after it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.attention.paged_launch import TileConfig, default_tile_config, launch_plan
from pagedserve.attention.split_plan import SplitPlan, active_segments
from pagedserve.attention.triton_cascade import cascade_prefix, merge_prefix
from pagedserve.attention.triton_kv_tile import load_kv_tile, online_softmax_step
from pagedserve.attention.torch_ref import FP8_MAX
from pagedserve.attention.triton_segment_merge import arrivals as _arrivals, merge_group, reduce_segments
from pagedserve.attention.triton_store_kv import RotaryStore, slot_row, to_cache
from pagedserve.layers.triton_launch import gdc_launch_dependents, gdc_wait, launch_fitting, pdl_launches
from pagedserve.layers.triton_ops import _LIBDEVICE, rotate_rows

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


@triton.jit
def _find_seq_idx(query_start_loc_ptr, q_block, seq_begin, seq_end, token_begin,
                  BLOCK_Q: tl.constexpr):
    """Last sequence s in [seq_begin, seq_end) whose first query tile is <= q_block."""
    lo: tl.int32 = seq_begin
    hi: tl.int32 = seq_end
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = (tl.load(query_start_loc_ptr + mid) - token_begin) // BLOCK_Q + (mid - seq_begin)
        if first_tile <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefetch_lines(ptrs):
    """prefetch.global.L2 of each address (a hint: nothing waits for it)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _prefetch_kv_rows(k_head_ptr, v_head_ptr, block_id, slot, stride_k_block, stride_k_slot, stride_v_block,
                      stride_v_slot, HEAD_DIM_PAD: tl.constexpr, PREFETCH_STEP: tl.constexpr):
    """The K and V rows of one tile's keys (block ids and slots given) into the L2, one address per
    128-byte line."""
    lines = tl.arange(0, HEAD_DIM_PAD // PREFETCH_STEP) * PREFETCH_STEP
    _prefetch_lines(k_head_ptr + block_id[:, None] * stride_k_block + slot[:, None] * stride_k_slot + lines[None, :])
    _prefetch_lines(v_head_ptr + block_id[:, None] * stride_v_block + slot[:, None] * stride_v_slot + lines[None, :])


# seq_begin/seq_end/num_seqs/num_segments may be 0 or 1: keep them runtime ints (no constexpr
# specialisation: one compiled variant serves every split count, decode and prefill alike).
@triton.jit(do_not_specialize=["seq_begin", "seq_end", "stride_block_table", "num_segments", "tiles_per_segment",
                               "short_tiles", "lone_tiles", "prefix_segments"])
def _paged_attention_kernel(
    out_ptr, partial_acc_ptr, partial_max_ptr, partial_sum_ptr, partial_active_ptr,
    query_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale_log2,  # softmax scale * log2(e)
    seq_begin, seq_end,  # this launch covers sequences [seq_begin, seq_end)
    num_segments,  # split-K slices (grid axis 2); 1 writes `out` directly
    tiles_per_segment, short_tiles, lone_tiles,  # how many of them work: active_segments
    stride_q_token, stride_q_head, stride_o_token, stride_o_head,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    stride_block_table,
    NUM_HEADS: tl.constexpr, QUERIES_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    ONE_TILE_PER_SEQ: tl.constexpr,  # every query_len <= BLOCK_Q: program i -> sequence begin + i
    DOT_PRECISION: tl.constexpr,
    # ROTARY_STORE (decode launches of all-decode batches: every query_len 1, so token s is sequence
    # s's: query_start_loc is not read): the step's query and new key are rotated
    # here (rotary at pos[token], cos / sin caches with duplicated halves) and the new key and value
    # stored at slot_mapping[token] by the last active segment before it reads their tile
    # (rotary_store_kv + this kernel in one launch, bit for bit)
    new_k_ptr=None, new_v_ptr=None, slot_mapping_ptr=None, cos_ptr=None, sin_ptr=None,
    stride_new_k=0, stride_new_v=0, stride_cos=0,
    ROTARY_STORE: tl.constexpr = False, LIBDEVICE: tl.constexpr = False,
    # MERGE (decode launches that split): the last segment of a (token, KV head) to finish merges
    # the group's partials itself (arrivals: zeroed counters it resets), no reduce launch after
    arrivals_ptr=None, MERGE: tl.constexpr = False, GROUP_PAD: tl.constexpr = 1, SEG_CHUNK: tl.constexpr = 16,
    # WAIT_INPUTS (ROTARY_STORE launches made as programmatic dependent launches, DECODE_PDL): the
    # program is placed while the projection before it runs, reads what that kernel does not write
    # (sequence length, block ids, cos / sin, slot), prefetches its first tile's K / V rows into the
    # L2 (a line every PREFETCH_STEP elements), then waits (griddepcontrol.wait) for the query,
    # key and value
    WAIT_INPUTS: tl.constexpr = False, PREFETCH_STEP: tl.constexpr = 64,
    # HEADS_FIRST: grid (num_kv_heads, query tiles, segments), a sequence's KV heads adjacent in
    # launch order (they read the same KV blocks at about the same time)
    HEADS_FIRST: tl.constexpr = False,
    # CASCADE (ROTARY_STORE launches after triton_cascade's prefix launch): keys [0, cascade_len[s]) of
    # a row s whose seq_len exceeds it were read there; this launch reads the rest, and its segment 0
    # starts from the prefix partials (prefix_segments slices each)
    cascade_len_ptr=None, prefix_acc_ptr=None, prefix_max_ptr=None, prefix_sum_ptr=None, prefix_segments=1,
    CASCADE: tl.constexpr = False,
):
    if HEADS_FIRST:
        kv_head, tile_pid = tl.program_id(0), tl.program_id(1)
        num_kv_programs, num_tile_pids = tl.num_programs(0), tl.num_programs(1)
    else:
        tile_pid, kv_head = tl.program_id(0), tl.program_id(1)
        num_tile_pids, num_kv_programs = tl.num_programs(0), tl.num_programs(1)
    segment = tl.program_id(2)
    if ONE_TILE_PER_SEQ:
        seq_idx = seq_begin + tile_pid
        q_block = 0
    else:
        # Reversed so the heaviest (latest, most keys) tiles start first.
        q_block_global = num_tile_pids - 1 - tile_pid
        token_begin = tl.load(query_start_loc_ptr + seq_begin)
        seq_idx = _find_seq_idx(query_start_loc_ptr, q_block_global, seq_begin, seq_end,
                                token_begin, BLOCK_Q)
        seq_first_tile = (tl.load(query_start_loc_ptr + seq_idx) - token_begin) // BLOCK_Q + (seq_idx - seq_begin)
        q_block = q_block_global - seq_first_tile
    # The loads below that do not depend on each other are issued together, ahead of the exits
    # and of the query's rotation: at batch 1 this launch is a chain of dependent round trips to
    # memory (sequence length -> block ids -> K/V tiles -> partials -> merge), not bandwidth.
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    if ROTARY_STORE:   # a decode launch of an all-decode batch: sequence s's one token is token s,
        q_start = seq_idx   # at position seq_len - 1 (input_batch's positions; this kernel's causal
        query_len = 1       # mask assumes it too): neither query_start_loc nor the positions are read
        pos = seq_len - 1
    else:
        q_start = tl.load(query_start_loc_ptr + seq_idx)
        query_len = tl.load(query_start_loc_ptr + seq_idx + 1) - q_start
        if q_block * BLOCK_Q >= query_len:
            return
    context_len = seq_len - query_len
    key_begin = 0
    if CASCADE:   # the shared prefix's keys (this row's: 0 if it has none) were read by the prefix launch
        prefix_len = tl.load(cascade_len_ptr + seq_idx)
        key_begin = tl.where(seq_len > prefix_len, prefix_len, 0)
    # Causal horizon of this tile (exclusive), then this segment's share of the key tiles.
    key_end = tl.minimum(context_len + (q_block + 1) * BLOCK_Q, seq_len)
    num_tiles = tl.cdiv(key_end - key_begin, TILE_N)
    active = active_segments(num_tiles, num_segments, tiles_per_segment, short_tiles, lone_tiles)
    if segment >= active:
        return   # nothing to read (the reduce merges only the active segments)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, TILE_N)
    query_pos = q_block * BLOCK_Q + offs_m // QUERIES_PER_KV  # index inside the chunk
    head = kv_head * QUERIES_PER_KV + offs_m % QUERIES_PER_KV
    row_valid = (offs_m < BLOCK_Q * QUERIES_PER_KV) & (query_pos < query_len)
    dim_valid = offs_d < HEAD_DIM
    token = (q_start + query_pos).to(tl.int64)
    tile_lo = segment * num_tiles // active
    tile_hi = (segment + 1) * num_tiles // active
    block_table_row = block_tables_ptr + seq_idx.to(tl.int64) * stride_block_table
    # Block ids of the next tile are loaded one iteration ahead, off the K/V loads' critical path;
    # the first tile's before the query is loaded and rotated, so that its round trip overlaps theirs.
    key_pos = key_begin + tile_lo * TILE_N + offs_n
    block_id = tl.load(block_table_row + key_pos // BLOCK_SIZE, mask=key_pos < key_end, other=0).to(tl.int64)
    q_rows = query_ptr + token[:, None] * stride_q_token + head[:, None] * stride_q_head
    query_abs = context_len + query_pos  # absolute position of each row's token
    k_head_ptr = k_cache_ptr + kv_head.to(tl.int64) * stride_k_head
    v_head_ptr = v_cache_ptr + kv_head.to(tl.int64) * stride_v_head
    if ROTARY_STORE:
        HALF: tl.constexpr = HEAD_DIM // 2
        partner_d = offs_d ^ HALF   # rotate-half's partner (HEAD_DIM is a power of two here)
        sign = tl.where(offs_d < HALF, -1.0, 1.0)
        # cos / sin loaded per row ([BLOCK_M, D], q's layout; the same row each): as [D] rows they
        # were converted to q's layout through shared memory, a barrier that waited for each load
        # before the next was issued
        rot = pos * stride_cos + offs_d[None, :] + 0 * offs_m[:, None]
        cos_rows = tl.load(cos_ptr + rot).to(tl.float32)
        sin_rows = tl.load(sin_ptr + rot).to(tl.float32)
        cos = tl.load(cos_ptr + pos * stride_cos + offs_d).to(tl.float32)
        sin = tl.load(sin_ptr + pos * stride_cos + offs_d).to(tl.float32)
        slot = tl.load(slot_mapping_ptr + q_start).to(tl.int64)
        if WAIT_INPUTS:   # launched early (PDL): what the step's projection does not write was read
            # above; warm the L2 with the first tile's K / V rows, then wait for the query, key, value
            _prefetch_kv_rows(k_head_ptr, v_head_ptr, block_id, key_pos % BLOCK_SIZE, stride_k_block,
                              stride_k_slot, stride_v_block, stride_v_slot, HEAD_DIM_PAD, PREFETCH_STEP)
            gdc_wait()
            # the projection after this launch (o's add_gemv with wait_inputs) may be placed now: the
            # SMs are free of the qkv gemv, which has finished
            gdc_launch_dependents()
        # the new key and value, loaded with the query (one round trip) and stored by the last
        # segment, whose tile holds them, before its loop reads that tile (as the plain launch reads
        # it after rotary_store_kv's store: bit for bit); stored after the loop, they cost the last
        # segment two more round trips at batch 1, where it finishes the launch (session 23)
        q = tl.load(q_rows + offs_d[None, :], mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
        q_partner = tl.load(q_rows + partner_d[None, :], mask=row_valid[:, None], other=0.0)
        new_k_row = new_k_ptr + q_start.to(tl.int64) * stride_new_k + kv_head * HEAD_DIM
        new_k_in = tl.load(new_k_row + offs_d)
        new_k_partner = tl.load(new_k_row + partner_d)
        new_v = tl.load(new_v_ptr + q_start.to(tl.int64) * stride_new_v + kv_head * HEAD_DIM + offs_d)
        q = rotate_rows(q, q_partner, cos_rows, sin_rows, sign[None, :], LIBDEVICE)
        if (slot >= 0) & (segment == active - 1):
            new_k = rotate_rows(new_k_in, new_k_partner, cos, sin, sign, LIBDEVICE)
            tl.store(slot_row(k_cache_ptr, slot, stride_k_block, stride_k_slot, BLOCK_SIZE)
                     + kv_head.to(tl.int64) * stride_k_head + offs_d, to_cache(new_k, k_cache_ptr))
            tl.store(slot_row(v_cache_ptr, slot, stride_v_block, stride_v_slot, BLOCK_SIZE)
                     + kv_head.to(tl.int64) * stride_v_head + offs_d, to_cache(new_v, v_cache_ptr))
        tl.debug_barrier()   # the stores performed for the whole program before its loop's loads
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    if (segment == 0) & (kv_head == 0) & (num_segments > 1):   # the reduce's count, per token
        tl.store(partial_active_ptr + token, active, mask=row_valid)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    if CASCADE:
        if (segment == 0) & (key_begin > 0):
            m_i, l_i, acc = merge_prefix(m_i, l_i, acc, prefix_acc_ptr, prefix_max_ptr, prefix_sum_ptr, token, head,
                                         row_valid, prefix_segments, NUM_HEADS, HEAD_DIM, HEAD_DIM_PAD)
    for tile in range(tile_lo, tile_hi):
        key_pos = key_begin + tile * TILE_N + offs_n
        key_valid = key_pos < key_end
        k, v = load_kv_tile(k_head_ptr, v_head_ptr, block_id, key_pos, key_valid, offs_d, dim_valid,
                            stride_k_block, stride_k_slot, stride_v_block, stride_v_slot, BLOCK_SIZE)
        next_pos = key_pos + TILE_N
        block_id = tl.load(block_table_row + next_pos // BLOCK_SIZE, mask=next_pos < key_end,
                           other=0).to(tl.int64)
        # key_pos <= query_abs implies key_pos < key_end for every valid row.
        m_i, l_i, acc = online_softmax_step(q, k, v, row_valid[:, None] & (key_pos[None, :] <= query_abs[:, None]),
                                            m_i, l_i, acc, scale_log2, DOT_PRECISION)
    store_mask = row_valid[:, None] & dim_valid[None, :]
    if active == 1:   # the one segment's output, as the merge of one segment divides (the reduce skips it)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + token[:, None] * stride_o_token + head[:, None] * stride_o_head + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        row = (token * NUM_HEADS + head) * num_segments + segment
        tl.store(partial_acc_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=store_mask)
        tl.store(partial_max_ptr + row, m_i, mask=row_valid)
        tl.store(partial_sum_ptr + row, l_i, mask=row_valid)
        if MERGE:   # query_len 1: the tile's token is q_start
            tl.debug_barrier()   # every thread's partials stored before the one arrival below
            arrival = arrivals_ptr + q_start.to(tl.int64) * num_kv_programs + kv_head
            if tl.atomic_add(arrival, 1, sem="acq_rel") == active - 1:
                # relaxed: the next launch sees the reset after the kernel boundary
                tl.atomic_xchg(arrival, 0, sem="relaxed")
                first = (q_start.to(tl.int64) * NUM_HEADS + kv_head * QUERIES_PER_KV) * num_segments
                merge_group(out_ptr + q_start.to(tl.int64) * stride_o_token
                            + (kv_head * QUERIES_PER_KV).to(tl.int64) * stride_o_head, stride_o_head,
                            partial_acc_ptr, partial_max_ptr, partial_sum_ptr, first, active, num_segments,
                            QUERIES_PER_KV, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD, SEG_CHUNK)


# Latency-bound decode launches that rotate and store (narrow_decode_launch's, all-decode) are
# programmatic dependent launches on sm_90+: placed while the qkv projection before them runs (the
# norm chain's qkv gemv lets them be placed at once: rms_norm_gemv's launch_dependents), they read
# the sequence length, block ids, cos / sin and slot and warm the L2 with their first K / V tile
# before they wait for the query, key and value; the chain of dependent round trips that such a
# launch is (the kernel's prologue) then starts behind the projection instead of after it. H200, one row, context
# 383 (benchmarks/RESULTS.md, session 27): llama-1b decode replay 0.841 -> 0.821 ms, llama-8b 3.944
# -> 3.888 ms. Wider launches are bandwidth-bound: not made so. Once its wait is over such a launch
# lets the o projection after it be placed (the chain's add_gemv with wait_inputs: its first weight
# slice loaded before it waits; llama-1b +0.7%).
DECODE_PDL = True

# Decode launches (one query tile a sequence) take the grid (num_kv_heads, sequences, segments): a
# sequence's KV-head programs adjacent in launch order read its KV blocks (all heads' rows
# interleaved in each) at about the same time instead of a few hundred programs apart. H200, thr512's
# decode contexts U[300, 1300], 448 rows: llama-1b heads 200.0 -> 189.2 us (3.71 -> 3.93 TB/s),
# llama-8b heads 367.0 -> 357.5; 256 rows -1.1% / -1.5%, 64 rows level; the same bits
# (benchmarks/attn_ncu.py --heads-first; RESULTS.md, session 31). Prefill launches keep the old grid.
DECODE_HEADS_FIRST = True

# Decode launches that split merge in the kernel: the last segment of each (token, KV head) to
# finish merges the group's partials (no reduce launch; benchmarks/RESULTS.md, session 13).
MERGE_IN_KERNEL = True


def _check_attention_inputs(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor,
                            query_start_loc: torch.Tensor | None, out: torch.Tensor | None) -> None:
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_dim]; got {tuple(query.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, "
                         f"head_dim]; got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[3] != query.shape[2] or query.shape[1] % k_cache.shape[2] != 0:
        raise ValueError(f"query heads/head_dim {tuple(query.shape[1:])} do not fit the cache's "
                         f"[num_kv_heads, head_dim] {tuple(k_cache.shape[2:])} (num_heads must be "
                         f"a multiple of num_kv_heads)")
    if query.dtype not in _FLOAT_DTYPES or v_cache.dtype != k_cache.dtype \
            or k_cache.dtype not in (query.dtype, *FP8_MAX):
        raise ValueError(f"query, k_cache, v_cache must share one dtype in {_FLOAT_DTYPES} (or the caches one FP8 "
                         f"type); got {query.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    for name, tensor in (("query", query), ("k_cache", k_cache), ("v_cache", v_cache)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim; strides {tensor.stride()}")
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    # query_start_loc None: an all-decode batch whose token s is sequence s's (decode_attention)
    if (seq_lens.dim() != 1 or block_tables.dim() != 2 or block_tables.shape[0] < num_seqs
            or query_start_loc is not None and query_start_loc.shape != (num_seqs + 1,)):
        raise ValueError(f"need seq_lens [num_seqs], query_start_loc [num_seqs + 1], block_tables "
                         f"[>= num_seqs, max_blocks]; got {tuple(seq_lens.shape)}, "
                         f"{tuple(query_start_loc.shape)}, {tuple(block_tables.shape)}")
    index_tensors = [("seq_lens", seq_lens), ("block_tables", block_tables)]
    if query_start_loc is not None:
        index_tensors.append(("query_start_loc", query_start_loc))
    for name, tensor in index_tensors:
        if tensor.dtype != torch.int32 or tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be a contiguous int32 tensor; got {tensor.dtype}, "
                             f"strides {tensor.stride()}")
    for name, tensor in [("k_cache", k_cache), ("v_cache", v_cache)] + index_tensors:
        if tensor.device != query.device:
            raise ValueError(f"{name} is on {tensor.device}, query is on {query.device}")
    if out is not None and (out.shape != query.shape or out.dtype != query.dtype
                            or out.device != query.device or out.stride(-1) != 1):
        raise ValueError(f"out must match query {tuple(query.shape)} {query.dtype} with a contiguous "
                         f"last dim; got {tuple(out.shape)} {out.dtype} strides {out.stride()}")


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float, max_query_len: int | None,
                    max_seq_len: int | None, num_decodes: int | None = None,
                    out: torch.Tensor | None = None, *, num_splits: int | SplitPlan | None = None,
                    tiles: TileConfig | None = None, rotary_store: RotaryStore | None = None,
                    cascade: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention of a ragged mixed batch over the paged KV cache (K/V of the query
    tokens must already be stored). query: [num_tokens, num_heads, head_dim]; returns `out`
    (allocated when None), written for tokens [query_start_loc[0], query_start_loc[-1]) only:
    padding rows past query_start_loc[-1] are left untouched.

    max_query_len / max_seq_len: host ints (upper bounds are fine); with both given the call
    never synchronises with the device, so it can be captured in a CUDA graph. num_decodes:
    the first num_decodes sequences have query_len 1 (decode-first order); they then get their
    own small-tile launch. None makes no assumption about the order. num_splits: None picks
    split-K automatically (choose_splits), 1 disables it, n > 1 forces n segments (the
    short-context rule: SplitPlan(n)), a SplitPlan forces that plan. tiles: overrides the
    default tile shapes of every launch (tuning only). Mutates only `out`, except with
    rotary_store (an all-decode batch: max_query_len 1, num_decodes = num_seqs, so token s is
    sequence s's, query_start_loc being 0, 1, ..., num_seqs, at position seq_lens[s] - 1: the
    launch reads neither), where the query and the new key are rotated and the new key and value
    stored in the same launch, as rotary_store_kv would before this call (the cache is then
    mutated; query and key are not). cascade: (cascade_len, cascade_rows, cascade_groups), int32 on
    the device (cascade_plan.shared_prefix's arrays): decode row s's keys [0, cascade_len[s]) are the
    prefix it shares with the other rows of its group (triton_cascade: read once for them all; no
    group: none). It needs the decode-first order (num_decodes); the decode rows of a mixed batch then take
    a call of their own (the cascade's tiles and plan), the other rows their usual launch.
    """
    _check_attention_inputs(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out)
    if rotary_store is not None:
        rotary_store.check(query, k_cache, v_cache, max_query_len, num_decodes, seq_lens.shape[0])
    if cascade is not None and not num_decodes:
        raise ValueError("paged_attention: cascade needs decode rows first (num_decodes >= 1)")
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if seq_lens.numel() else 0
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if seq_lens.numel() else 0
    if out is None:
        out = torch.empty_like(query)
    num_seqs, num_tokens = seq_lens.shape[0], query.shape[0]
    if num_seqs == 0 or num_tokens == 0 or max_query_len == 0:
        return out
    num_heads, head_dim, num_kv_heads = query.shape[1], query.shape[2], k_cache.shape[2]
    queries_per_kv, head_dim_pad = num_heads // num_kv_heads, triton.next_power_of_2(head_dim)
    num_decodes = num_decodes or 0
    if not 0 <= num_decodes <= num_seqs:
        raise ValueError(f"num_decodes={num_decodes} must lie in [0, num_seqs={num_seqs}]")
    decode_launch = num_decodes > 0
    if cascade is not None and num_decodes < num_seqs:   # a mixed batch: its decode rows first, in a call of their own
        paged_attention(query[:num_decodes], k_cache, v_cache, block_tables[:num_decodes], seq_lens[:num_decodes],
                        query_start_loc[:num_decodes + 1], scale, 1, max_seq_len, num_decodes, out[:num_decodes],
                        cascade=cascade)
        cascade, decode_launch = None, False
    # (seq_begin, seq_end, max_query_len, token upper bound) of each launch
    launches = [(0, num_decodes, 1, num_decodes)] if decode_launch else []
    if num_decodes < num_seqs:
        launches.append((num_decodes, num_seqs, max_query_len, num_tokens - num_decodes))
    tiles, plan, narrow = launch_plan(num_seqs, num_heads, num_kv_heads, head_dim_pad, max_query_len, max_seq_len,
                                      query.dtype, query.device, num_splits, tiles, cascade=cascade is not None)
    if plan.num_segments < 1:
        raise ValueError(f"num_splits must be >= 1 or None; got {num_splits}")
    partials = None
    if plan.num_segments > 1:
        rows = num_tokens * num_heads * plan.num_segments
        partials = (torch.empty(rows, head_dim_pad, dtype=torch.float32, device=query.device),
                    torch.empty(rows, dtype=torch.float32, device=query.device),
                    torch.empty(rows, dtype=torch.float32, device=query.device),
                    torch.empty(num_tokens, dtype=torch.int32, device=query.device))
    arrivals = None
    if partials is not None and MERGE_IN_KERNEL and max_query_len == 1:
        arrivals = _arrivals(query.device, num_tokens * num_kv_heads)
    prefix = None   # the decode launch's cascade arguments: each row's prefix keys and the prefix launch's partials
    if cascade is not None:
        rope = (rotary_store.cos_cache, rotary_store.sin_cache) if rotary_store is not None else (None, None)
        prefix = (cascade[0], *cascade_prefix(query, k_cache, v_cache, block_tables, seq_lens, cascade, *rope, scale))
    for seq_begin, seq_end, launch_max_query_len, launch_tokens in launches:
        config = tiles or default_tile_config(queries_per_kv, head_dim_pad, launch_max_query_len, query.dtype,
                                              k_cache.element_size() == 1)
        _launch_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                          out, partials, seq_begin, seq_end, launch_max_query_len, launch_tokens,
                          config, plan, rotary_store, arrivals,
                          wait_inputs=rotary_store is not None and narrow and DECODE_PDL
                          and pdl_launches(query.device), prefix=prefix)
    if partials is not None and arrivals is None:
        reduce_segments(out, partials, query_start_loc, plan.num_segments)
    return out


def _launch_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor,
                      query_start_loc: torch.Tensor, scale: float, out: torch.Tensor,
                      partials: tuple[torch.Tensor, ...] | None,
                      seq_begin: int, seq_end: int, max_query_len: int, max_tokens: int,
                      config: TileConfig, plan: SplitPlan, rotary_store: RotaryStore | None = None,
                      arrivals: torch.Tensor | None = None, wait_inputs: bool = False,
                      prefix: tuple | None = None) -> None:
    """One kernel launch over sequences [seq_begin, seq_end) whose query tokens number at
    most max_tokens. Writes `out` (one active segment) or the fp32 partials and, per token,
    the count of active segments."""
    num_heads, head_dim, num_kv_heads = query.shape[1], query.shape[2], k_cache.shape[2]
    queries_per_kv = num_heads // num_kv_heads
    if config.block_m < max(16, queries_per_kv) or config.block_m & (config.block_m - 1):
        raise ValueError(f"block_m={config.block_m} must be a power of two >= max(16, queries_per_kv)")
    block_q = config.block_m // queries_per_kv
    num_launch_seqs = seq_end - seq_begin
    # one program per sequence only for decode-like launches (fewer kernel variants)
    one_tile_per_seq = max_query_len <= block_q and (max_query_len * queries_per_kv <= 16 or max_query_len == 1)
    # Sum over sequences of cdiv(query_len, block_q) <= max_tokens // block_q + num_seqs.
    grid_q = num_launch_seqs if one_tile_per_seq else max(max_tokens, 0) // block_q + num_launch_seqs
    new = {}
    if rotary_store is not None:
        r = rotary_store
        new = dict(new_k_ptr=r.key, new_v_ptr=r.value, slot_mapping_ptr=r.slot_mapping,
                   cos_ptr=r.cos_cache, sin_ptr=r.sin_cache, stride_new_k=r.key.stride(0),
                   stride_new_v=r.value.stride(0), stride_cos=r.cos_cache.stride(0), ROTARY_STORE=True,
                   LIBDEVICE=_LIBDEVICE)
    if wait_inputs:   # a rotary_store launch (its query, key and value are read after the wait)
        new.update(WAIT_INPUTS=True, PREFETCH_STEP=min(128 // k_cache.element_size(), triton.next_power_of_2(head_dim)),
                   launch_pdl=True)
    if arrivals is not None:   # every query_len 1 (the caller's max_query_len): merged in the launch
        group_pad = triton.next_power_of_2(queries_per_kv)
        new.update(arrivals_ptr=arrivals, MERGE=True, GROUP_PAD=group_pad, SEG_CHUNK=max(8, 64 // group_pad))
    if prefix is not None:   # (each row's prefix keys, then cascade_prefix's acc, max, sum and segments)
        new.update(cascade_len_ptr=prefix[0], prefix_acc_ptr=prefix[1], prefix_max_ptr=prefix[2],
                   prefix_sum_ptr=prefix[3], prefix_segments=prefix[4], CASCADE=True)
    if config.max_registers is not None:
        new.update(maxnreg=config.max_registers)
    heads_first = one_tile_per_seq and DECODE_HEADS_FIRST and grid_q < 65536   # CUDA's grid y limit
    if heads_first:
        new.update(HEADS_FIRST=True)
    grid = (num_kv_heads, grid_q, plan.num_segments) if heads_first else (grid_q, num_kv_heads, plan.num_segments)
    launch_fitting(
        _paged_attention_kernel, grid,
        out, *(partials if partials is not None else (out, out, out, out)),
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        scale * _LOG2E, seq_begin, seq_end, *plan.args(),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        NUM_HEADS=num_heads, QUERIES_PER_KV=queries_per_kv,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=config.block_m, BLOCK_Q=block_q, TILE_N=config.tile_n,
        ONE_TILE_PER_SEQ=one_tile_per_seq,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, stages=config.num_stages, **new,
    )

