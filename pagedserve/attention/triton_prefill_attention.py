"""FlashAttention-style Triton kernel for the prefill chunks of a step: each chunk's NEW tokens
attend to its cached context (read through the block table) and, causally, to each other
(read from this step's contiguous key/value, not from the cache).

Grid: (num_heads, query tiles). A program owns BLOCK_M consecutive new tokens of ONE
sequence for ONE query head; the query heads of a GQA group are neighbours on grid axis 0,
so they run together and share each K/V tile through L2. Query tiles are numbered per
sequence without a host sync (as in triton_paged_attention: binary search over
query_start_loc), latest tiles first (they have the most keys).

For a tile of sequence s whose new tokens start at row `tile_lo` of its chunk
(context_len = seq_len - query_len cached tokens before the chunk):

    context keys  [0, context_len)          paged cache, BLOCK_N at a time, no causal mask
    new keys      [0, tile_lo)               contiguous key/value, no mask at all
    new keys      [tile_lo, tile_lo+BLOCK_M) the diagonal: causal mask (BLOCK_M / BLOCK_N tiles)

(NEW_KV_FROM_CACHE: the new keys are read through the block table as well, at positions
context_len + index; the same numbers, as they are stored before attention.)

One online softmax (fp32, log2 domain) runs over all three, so no log-sum-exp merge is
needed. Every row sees at least one key, so no row is fully masked.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from pagedserve.attention.triton_paged_attention import _LOG2E, _check_attention_inputs, _find_seq_idx
from pagedserve.attention.triton_store_kv import fp8_operands
from pagedserve.layers.triton_launch import launch_fitting


@triton.jit
def _softmax_step(q, k, v, acc, m_i, l_i, scale_log2, mask, APPLY_MASK: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """One online-softmax step of a [BLOCK_M, D] query tile over a [BLOCK_N, D] K/V tile; m_i is
    the running max of the scaled scores (log2 domain), so the scale and the max fold into one FMA."""
    if k.dtype.is_fp8():   # an FP8 cache (kv_cache_dtype): fp8_operands
        q, k, v = fp8_operands(q, k, v)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if APPLY_MASK:
        s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    p = tl.math.exp2(s * scale_log2 - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _load_rows(base, row_offset, valid, offs_d, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """[len(row_offset), HEAD_DIM_PAD]: D contiguous values at each base + row_offset; masks only
    what may be invalid (rows when MASK_ROWS, the padded dims when HEAD_DIM is not a power of 2)."""
    ptrs = base + row_offset[:, None] + offs_d[None, :]
    if HEAD_DIM != HEAD_DIM_PAD:
        mask = offs_d[None, :] < HEAD_DIM
        if MASK_ROWS:
            mask = mask & valid[:, None]
        return tl.load(ptrs, mask=mask, other=0.0)
    if MASK_ROWS:
        return tl.load(ptrs, mask=valid[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _load_paged(cache_head, block_table_row, key_pos, valid, offs_d, stride_block, stride_slot,
                BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                MASK_ROWS: tl.constexpr):
    """K or V rows of cache positions key_pos through the block table."""
    if MASK_ROWS:
        block_id = tl.load(block_table_row + key_pos // BLOCK_SIZE, mask=valid, other=0)
    else:
        block_id = tl.load(block_table_row + key_pos // BLOCK_SIZE)
    row_offset = block_id.to(tl.int64) * stride_block + (key_pos % BLOCK_SIZE) * stride_slot
    return _load_rows(cache_head, row_offset, valid, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASK_ROWS)


@triton.jit
def _load_new_kv(k_base, v_base, stride_k_token, stride_v_token, kc_head, vc_head, block_table_row,
                 stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot, key_idx, context_len,
                 valid, offs_d, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                 MASK_ROWS: tl.constexpr, NEW_KV_FROM_CACHE: tl.constexpr):
    """K/V of new tokens key_idx of the chunk: from this step's tensors, or from the cache."""
    if NEW_KV_FROM_CACHE:
        key_pos = context_len + key_idx
        k = _load_paged(kc_head, block_table_row, key_pos, valid, offs_d, stride_kc_block, stride_kc_slot,
                        BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, MASK_ROWS)
        v = _load_paged(vc_head, block_table_row, key_pos, valid, offs_d, stride_vc_block, stride_vc_slot,
                        BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, MASK_ROWS)
    else:
        k = _load_rows(k_base, key_idx * stride_k_token, valid, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASK_ROWS)
        v = _load_rows(v_base, key_idx * stride_v_token, valid, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASK_ROWS)
    return k, v


@triton.jit
def _load_context(kc_head, vc_head, block_table_row, stride_kc_block, stride_kc_slot, stride_vc_block,
                  stride_vc_slot, ck_base, cv_base, stride_ck_token, stride_cv_token, key_pos, valid, offs_d,
                  BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                  MASK_ROWS: tl.constexpr, CONTEXT_CONTIGUOUS: tl.constexpr):
    """K/V of context positions key_pos: through the block table, or from a contiguous copy."""
    if CONTEXT_CONTIGUOUS:
        k = _load_rows(ck_base, key_pos * stride_ck_token, valid, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASK_ROWS)
        v = _load_rows(cv_base, key_pos * stride_cv_token, valid, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASK_ROWS)
    else:
        k = _load_paged(kc_head, block_table_row, key_pos, valid, offs_d, stride_kc_block, stride_kc_slot,
                        BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, MASK_ROWS)
        v = _load_paged(vc_head, block_table_row, key_pos, valid, offs_d, stride_vc_block, stride_vc_slot,
                        BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, MASK_ROWS)
    return k, v


@triton.jit(do_not_specialize=["seq_begin", "seq_end", "stride_block_table"])
def _prefill_attention_kernel(
    out_ptr, query_ptr, key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, ctx_key_ptr, ctx_value_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale_log2,  # softmax scale * log2(e)
    seq_begin, seq_end,  # this launch covers sequences [seq_begin, seq_end)
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    stride_o_token, stride_o_head,
    stride_kc_block, stride_kc_slot, stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head,
    stride_block_table, stride_ck_token, stride_ck_head, stride_cv_token, stride_cv_head,
    QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NEW_KV_FROM_CACHE: tl.constexpr,  # read the new tokens' K/V through the block table too
    CONTEXT_CONTIGUOUS: tl.constexpr,  # one sequence whose context is a contiguous copy (ctx_key/value)
    SAME_KV_STRIDES: tl.constexpr,  # k_cache and v_cache strides equal: one row offset for both
    CACHE_I64: tl.constexpr,  # a cache of >= 2**31 elements: its row offsets in int64
    DOT_PRECISION: tl.constexpr,
):
    head = tl.program_id(0)
    kv_head = head // QUERIES_PER_KV
    q_block_global = tl.num_programs(1) - 1 - tl.program_id(1)  # latest tiles first
    token_begin = tl.load(query_start_loc_ptr + seq_begin)
    seq_idx = _find_seq_idx(query_start_loc_ptr, q_block_global, seq_begin, seq_end, token_begin, BLOCK_M)
    seq_first_tile = (tl.load(query_start_loc_ptr + seq_idx) - token_begin) // BLOCK_M + (seq_idx - seq_begin)
    tile_lo = (q_block_global - seq_first_tile) * BLOCK_M  # first row of this tile in its chunk
    q_start = tl.load(query_start_loc_ptr + seq_idx)
    query_len = tl.load(query_start_loc_ptr + seq_idx + 1) - q_start
    if tile_lo >= query_len:
        return
    context_len = tl.load(seq_lens_ptr + seq_idx) - query_len

    offs_m = tile_lo + tl.arange(0, BLOCK_M)  # rows of the chunk
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_valid = offs_m < query_len
    q = _load_rows(query_ptr + q_start.to(tl.int64) * stride_q_token + head * stride_q_head,
                   offs_m * stride_q_token, row_valid, offs_d, HEAD_DIM, HEAD_DIM_PAD, True)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    block_table_row = block_tables_ptr + seq_idx.to(tl.int64) * stride_block_table
    kc_head = k_cache_ptr + kv_head.to(tl.int64) * stride_kc_head
    vc_head = v_cache_ptr + kv_head.to(tl.int64) * stride_vc_head
    k_base = key_ptr + q_start.to(tl.int64) * stride_k_token + kv_head * stride_k_head
    v_base = value_ptr + q_start.to(tl.int64) * stride_v_token + kv_head * stride_v_head

    # 1. cached context through the block table (every context key precedes every row):
    # whole tiles unmasked, then the partial last tile.
    ck_base = ctx_key_ptr + kv_head * stride_ck_head
    cv_base = ctx_value_ptr + kv_head * stride_cv_head
    full_end = context_len - context_len % BLOCK_N
    if not CONTEXT_CONTIGUOUS:
        # Each tile's block ids are loaded one tile ahead (kept in registers): the K/V rows of a
        # tile then hang on no load of their own iteration, and the pipeliner keeps num_stages - 1
        # tiles in flight (reading block ids in the iteration itself, it waited for every copy
        # at the top of each iteration: no overlap of the loads with the dots on sm_90).
        # A tile of whole cache blocks (BLOCK_N a multiple of BLOCK_SIZE: every default shape)
        # starts on a block boundary, so a row's slot and its block's index in the tile are the
        # same in every tile (loop invariant); one row offset addresses K and V when their caches
        # share strides.
        ALIGNED: tl.constexpr = BLOCK_N % BLOCK_SIZE == 0
        blk = tl.load(block_table_row + offs_n // BLOCK_SIZE, mask=offs_n < full_end, other=0)
        for start in range(0, full_end, BLOCK_N):
            next_start = start + BLOCK_N
            if ALIGNED:
                slot = offs_n % BLOCK_SIZE
                next_block = next_start // BLOCK_SIZE + offs_n // BLOCK_SIZE
            else:
                slot = (start + offs_n) % BLOCK_SIZE
                next_block = (next_start + offs_n) // BLOCK_SIZE
            if CACHE_I64:
                blk = blk.to(tl.int64)
            k_off = blk * stride_kc_block + slot * stride_kc_slot
            if SAME_KV_STRIDES:
                v_off = k_off
            else:
                v_off = blk * stride_vc_block + slot * stride_vc_slot
            k = _load_rows(kc_head, k_off, offs_n, offs_d, HEAD_DIM, HEAD_DIM_PAD, False)
            v = _load_rows(vc_head, v_off, offs_n, offs_d, HEAD_DIM, HEAD_DIM_PAD, False)
            blk = tl.load(block_table_row + next_block, mask=next_start + offs_n < full_end, other=0)
            acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, scale_log2, row_valid[:, None], False,
                                          DOT_PRECISION)
    else:
        for start in range(0, full_end, BLOCK_N):
            key_pos = start + offs_n
            k, v = _load_context(kc_head, vc_head, block_table_row, stride_kc_block, stride_kc_slot,
                                 stride_vc_block, stride_vc_slot, ck_base, cv_base, stride_ck_token, stride_cv_token,
                                 key_pos, key_pos, offs_d, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, False,
                                 CONTEXT_CONTIGUOUS)
            acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, scale_log2, row_valid[:, None], False,
                                          DOT_PRECISION)
    if full_end < context_len:
        key_pos = full_end + offs_n
        key_valid = key_pos < context_len
        k, v = _load_context(kc_head, vc_head, block_table_row, stride_kc_block, stride_kc_slot, stride_vc_block,
                             stride_vc_slot, ck_base, cv_base, stride_ck_token, stride_cv_token, key_pos, key_valid,
                             offs_d, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, True, CONTEXT_CONTIGUOUS)
        acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, scale_log2, key_valid[None, :], True,
                                      DOT_PRECISION)

    # 2. new tokens before the tile: all visible to every row, never masked.
    for start in range(0, tile_lo, BLOCK_N):
        key_idx = start + offs_n
        k, v = _load_new_kv(k_base, v_base, stride_k_token, stride_v_token, kc_head, vc_head, block_table_row,
                            stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot, key_idx,
                            context_len, key_idx, offs_d, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, False,
                            NEW_KV_FROM_CACHE)
        acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, scale_log2, row_valid[:, None], False,
                                      DOT_PRECISION)

    # 3. the diagonal: causal mask (key <= row), keys past the chunk's end are masked too.
    diag_end = tl.minimum(tile_lo + BLOCK_M, query_len)
    for start in range(tile_lo, diag_end, BLOCK_N):
        key_idx = start + offs_n
        key_valid = key_idx < diag_end
        k, v = _load_new_kv(k_base, v_base, stride_k_token, stride_v_token, kc_head, vc_head, block_table_row,
                            stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot, key_idx,
                            context_len, key_valid, offs_d, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD, True,
                            NEW_KV_FROM_CACHE)
        causal = key_valid[None, :] & (key_idx[None, :] <= offs_m[:, None])
        acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, scale_log2, causal, True, DOT_PRECISION)

    out = acc / l_i[:, None]
    out_ptrs = out_ptr + (q_start + offs_m).to(tl.int64)[:, None] * stride_o_token + head * stride_o_head \
        + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & (offs_d[None, :] < HEAD_DIM))


@dataclass(frozen=True)
class PrefillTiles:
    """Launch shape: block_m query rows (tokens of one head) per program, block_n keys per
    loop step; block_m a multiple of block_n, both powers of two >= 16."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# 16-bit types on Hopper-sized GPUs, launches of at least LARGE_MIN_TOKENS new tokens (the
# long chunks of a long-context prefill): 128 x 128 tiles, 8 warps, 3 stages (224 KB of shared
# memory). Smaller launches keep 128 x 64 (more programs for few tokens). H200, an 8k chunk after
# 4k-12k of context: 435-453 TFLOP/s, against 318-365 with 128 x 64 tiles and the block ids read in
# the tile (benchmarks/RESULTS.md). Module-level so that a benchmark can A/B them on one engine.
LARGE_TILES = PrefillTiles(block_m=128, block_n=128, num_warps=8, num_stages=3)
SMALL_TILES = PrefillTiles(block_m=128, block_n=64, num_warps=8, num_stages=3)
LARGE_MIN_TOKENS = 1024
# Launches whose longest sequence (cached context + new tokens) is at most SHORT_MAX_KEYS keys: a
# prefill step of many short prompts (peers.py's thr512: 13-17 prompts of 64-1024 tokens a step), where
# a program's few key tiles cannot amortise a 128-row tile's start and its half-masked diagonal:
# 64 x 64 tiles, 4 warps. H200, bf16, against LARGE_TILES (benchmarks/prefill_short.py; RESULTS.md
# session 28): 13 prompts of thr512's lengths, 8,192 tokens, 172 -> 105 us at llama-1b's heads, 254 -> 206 us at
# llama-8b's; 2 x 2048 fresh 134 -> 110 / 199 -> 184; 4 chunks of 512 after 1,536 cached 128 -> 91 /
# 168 -> 160; 8 of 256 after 768 (llama-8b's heads) 110 -> 120, the one loss measured. (64 x 32 tiles
# were faster still on fresh prompts at head_dim 128, 187 us a thr512 step, and slower after a
# context: 179 / 124 us on the last two.) Past SHORT_MAX_KEYS at head_dim 128 LARGE_TILES wins (4,096
# keys: 323 against 351); at head_dim 64 SMALL_TILES does at every length measured (8,192 fresh: 645
# us against 780), so LARGE_TILES is for head dims above 64 only.
SHORT_TILES = PrefillTiles(block_m=64, block_n=64, num_warps=4, num_stages=3)
SHORT_MAX_KEYS = 2048
# Caches spanning at least this many elements address their rows in int64 in the context loop (int32
# offsets cost 2 instructions a row there, int64 ones ~9); a module-level value so that a test can
# take the int64 path on a small cache.
I64_CACHE_ELEMENTS = 2**31


# Launch shapes this GPU refused for shared memory (LARGE_TILES takes 224 KB: an H100 / H200 holds
# it, an A100's 164 KB or a workstation GPU's ~100 KB does not): the next smaller shape from then on;
# the smallest at fewer pipeline stages if it must (fp32 at head_dim 256 takes 100 KiB at its 2 stages:
# layers/triton_launch.py).
_UNFIT: set[PrefillTiles] = set()
logger = logging.getLogger(__name__)


def _with_fallbacks(tiles: PrefillTiles, head_dim_pad: int) -> list[PrefillTiles]:
    """tiles, then the smaller default shapes (SMALL_TILES, the fp32 one), less those refused."""
    size = lambda t: t.block_m * t.block_n * t.num_stages   # noqa: E731
    smallest = default_prefill_tiles(torch.float32, head_dim_pad)
    chain = [tiles] + [t for t in (SMALL_TILES, smallest) if size(t) < size(tiles)]
    return [t for t in chain if t not in _UNFIT] or chain[-1:]


def _elements_spanned(tensor: torch.Tensor) -> int:
    """1 + the largest element offset a view's strides reach (numel for a contiguous tensor)."""
    return 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))


def default_prefill_tiles(dtype: torch.dtype, head_dim_pad: int, max_tokens: int = 0,
                          max_keys: int | None = None) -> PrefillTiles:
    """16-bit types: SHORT_TILES when the launch's longest sequence (max_keys: context + new
    tokens, where the caller knows it) is at most SHORT_MAX_KEYS, else LARGE_TILES (head dims
    above 64) / SMALL_TILES by the launch's token bound; fp32 tiles stay small enough for the
    register file (fp32 is the parity/test dtype, not the fast one)."""
    if dtype != torch.float32 and head_dim_pad <= 128:
        if max_keys is not None and max_keys <= SHORT_MAX_KEYS:
            return SHORT_TILES
        return LARGE_TILES if max_tokens >= LARGE_MIN_TOKENS and head_dim_pad > 64 else SMALL_TILES
    return PrefillTiles(block_m=64, block_n=32 if head_dim_pad <= 128 else 16, num_warps=4, num_stages=2)


def prefill_attention(query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                      out: torch.Tensor, seq_begin: int, seq_end: int, max_tokens: int,
                      tiles: PrefillTiles | None = None,
                      context: tuple[torch.Tensor, torch.Tensor] | None = None,
                      max_keys: int | None = None) -> torch.Tensor:
    """Causal attention of the prefill chunks of sequences [seq_begin, seq_end): query
    [num_tokens, num_heads, D], key/value [num_tokens, num_kv_heads, D] of this step (any token
    stride, contiguous last dim), each chunk's earlier context in k_cache/v_cache through
    block_tables. key/value None: the new tokens' K/V are read from the cache too (they are
    stored before attention). max_tokens: a host upper bound on these sequences' new tokens
    (the grid). context: for a launch of ONE sequence, its context K/V as contiguous copies
    [context_len, num_kv_heads, D] (gathered once; read faster than through the block table).
    max_keys: a host upper bound on these sequences' lengths (context + new), for the tiles.
    Writes `out` rows of these sequences only (and returns it); never syncs with the device."""
    _check_attention_inputs(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out)
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    new_kv_from_cache = key is None or value is None
    if new_kv_from_cache:
        key = value = k_cache  # unused pointers
    elif key.shape[1:] != (num_kv_heads, head_dim) or value.shape != key.shape or key.dtype != query.dtype \
            or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError(f"key/value must be [num_tokens, {num_kv_heads}, {head_dim}] {query.dtype} with a "
                         f"contiguous last dim; got {tuple(key.shape)} {key.dtype}, {tuple(value.shape)}")
    head_dim_pad = triton.next_power_of_2(head_dim)
    tiles = tiles or default_prefill_tiles(query.dtype, head_dim_pad, max_tokens, max_keys)
    if tiles.block_m % tiles.block_n:
        raise ValueError(f"block_m={tiles.block_m} must be a multiple of block_n={tiles.block_n}")
    num_launch_seqs = seq_end - seq_begin
    if num_launch_seqs <= 0 or max_tokens <= 0:
        return out
    if context is not None and num_launch_seqs != 1:
        raise ValueError("a contiguous context is for a launch of one sequence")
    ctx_key, ctx_value = context if context is not None else (key, value)  # unused when None
    chain = _with_fallbacks(tiles, head_dim_pad)
    for tiles in chain:
        # Sum over sequences of cdiv(query_len, block_m) <= max_tokens // block_m + num_seqs.
        grid = (num_heads, max_tokens // tiles.block_m + num_launch_seqs)
        try:   # (the resource check comes before the launch: nothing is enqueued when it fails)
            launch_fitting(   # the last shape of the chain at fewer stages too, if it must
                _prefill_attention_kernel, grid,
                out, query, key, value, k_cache, v_cache, ctx_key, ctx_value, block_tables, seq_lens, query_start_loc,
                scale * _LOG2E, seq_begin, seq_end,
                query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
                out.stride(0), out.stride(1),
                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                block_tables.stride(0), ctx_key.stride(0), ctx_key.stride(1), ctx_value.stride(0), ctx_value.stride(1),
                QUERIES_PER_KV=num_heads // num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
                BLOCK_SIZE=k_cache.shape[1], BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                NEW_KV_FROM_CACHE=new_kv_from_cache, CONTEXT_CONTIGUOUS=context is not None,
                SAME_KV_STRIDES=k_cache.stride() == v_cache.stride(),
                CACHE_I64=max(_elements_spanned(k_cache), _elements_spanned(v_cache)) >= I64_CACHE_ELEMENTS,
                DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
                num_warps=tiles.num_warps, stages=tiles.num_stages,
                min_stages=1 if tiles == chain[-1] else tiles.num_stages,
            )
            return out
        except OutOfResources as exc:
            _UNFIT.add(tiles)
            refused = exc
            logger.warning("prefill attention tiles %s do not fit this GPU (%s): smaller ones from now on", tiles, exc)
    raise refused
