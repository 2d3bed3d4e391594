"""Split-K plans of the decode attention launches (flash-decoding): how many programs share a
sequence's key tiles (choose_splits -> SplitPlan), and which of them work (active_segments,
run inside triton_paged_attention's kernel and the merge). Module-level rules so that the
benchmarks can A/B them (benchmarks/attn_tail.py, step_profile.py) and the tests can pin them."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# How a decode's n key tiles (TILE_N keys each, the new key included) are split over the
# launch's num_segments programs, from the H200 timings
# of benchmarks/decode_gpu.py's "attn" stage (bs 1, llama-1b / 8b shapes, 2026-12-01):
# n <= LONE_TILES: one segment (a merge costs more than it saves: 2 tiles 4.9 us alone, 6.5 us
# split); n <= SHORT_TILES: one tile a segment (6 tiles: 6.4 us against 7.2 at two a segment);
# longer: TILES_PER_SEGMENT a segment (16 tiles: 7.6 us against 7.9 at one; 32 tiles: 9.6
# against 13.1), at most num_segments. Segments past the active ones do nothing.
TILES_PER_SEGMENT = 2
SHORT_TILES = 8
LONE_TILES = 2


@triton.jit
def active_segments(num_tiles, num_segments, tiles_per_segment, short_tiles, lone_tiles):
    """How many of num_segments programs share num_tiles key tiles (the rule above); segment s
    of them takes tiles [s * num_tiles // active, (s + 1) * num_tiles // active)."""
    per_segment = tl.where(num_tiles <= short_tiles, 1, tiles_per_segment)
    active = tl.minimum(num_segments, tl.maximum(tl.cdiv(num_tiles, per_segment), 1))
    return tl.where(num_tiles <= lone_tiles, 1, active)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """The device's SMs (split-K plans programs per SM)."""
    if device.type != "cuda":
        return 8  # Triton interpreter: any small number keeps the split heuristics testable
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class SplitPlan:
    """Split-K of a launch: num_segments programs per (query tile, KV head) (grid axis 2), of
    which a query tile with n key tiles uses active_segments(n, num_segments, tiles_per_segment,
    short_tiles, lone_tiles); both decode kernels take one (they must split alike to round alike)."""

    num_segments: int
    tiles_per_segment: int = TILES_PER_SEGMENT
    short_tiles: int = SHORT_TILES
    lone_tiles: int = LONE_TILES

    def args(self) -> tuple[int, int, int, int]:
        return self.num_segments, self.tiles_per_segment, self.short_tiles, self.lone_tiles


NO_SPLIT = SplitPlan(1)

# The count rule ("legacy"): fewer programs (sequence x KV head) than SMs aim at ~2 programs
# per SM, >= 1 key tile each; below SPLIT_BELOW_PROGRAMS_PER_SM programs per SM, at ~2x that
# many programs of >= MIN_TILES_PER_SPLIT tiles each; every sequence gets the same count.
# "chunked" (the default) keeps that plan unless its segments could exceed CHUNK_TILES key
# tiles at max_seq_len (in a CUDA graph: max_model_len); then every context is split into
# segments of CHUNK_TILES (the last one shorter), so programs carry about equal work whatever
# the mix of context lengths (as FlashInfer's balanced split-KV); the grid holds as many as
# the bound needs, unused ones exit after three loads. H200, llama-8b heads, the kernel alone
# (benchmarks/RESULTS.md, "Decode split-K by equal chunks"): 35 rows at 4k-16k 399 -> 364 us
# (0.91 -> 1.00 of 4 TB/s), 16 rows 254 -> 175, 8 rows 133 -> 89; chunks of 16 tiles cost
# thr512's shapes (bound 2048) 3-4% (a second, nearly empty segment and its reduce), 32 none.
SPLIT_RULE = "chunked"
CHUNK_TILES = 32
MAX_SEGMENTS = 64
MAX_PARTIAL_BYTES = 64 << 20   # the fp32 partials of one launch (graph pools hold them)
SPLIT_BELOW_PROGRAMS_PER_SM = 4
MIN_TILES_PER_SPLIT = 8


def choose_splits(num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int, tile_n: int,
                  sm_count: int, num_heads: int | None = None, head_dim_pad: int = 128) -> SplitPlan:
    """Split-K for a decode-only batch (prefill never splits) with contexts of at least 4 key
    tiles: the count rule, or (SPLIT_RULE "chunked") equal chunks where the count rule's
    segments could exceed CHUNK_TILES at max_seq_len (comment above). num_heads (query heads;
    default 4 a KV head) sizes the partials, which stay under MAX_PARTIAL_BYTES."""
    programs = num_seqs * num_kv_heads
    key_tiles = triton.cdiv(max_seq_len, tile_n)
    if max_query_len != 1 or key_tiles < 4:
        return NO_SPLIT
    if programs < sm_count:
        wanted = min(triton.cdiv(2 * sm_count, programs), key_tiles, MAX_SEGMENTS)
    elif programs < SPLIT_BELOW_PROGRAMS_PER_SM * sm_count:
        wanted = min(triton.cdiv(2 * SPLIT_BELOW_PROGRAMS_PER_SM * sm_count, programs),
                     key_tiles // MIN_TILES_PER_SPLIT, MAX_SEGMENTS)
    else:
        wanted = 1
    count = 1 << (max(wanted, 1).bit_length() - 1)
    if SPLIT_RULE == "legacy" or triton.cdiv(key_tiles, count) <= CHUNK_TILES:
        return SplitPlan(count) if count >= 2 else NO_SPLIT
    row_bytes = num_seqs * (num_heads or 4 * num_kv_heads) * (head_dim_pad + 2) * 4
    cap = max(1, min(MAX_SEGMENTS, MAX_PARTIAL_BYTES // row_bytes))
    chunk = max(CHUNK_TILES, triton.cdiv(key_tiles, cap))
    segments = triton.cdiv(key_tiles, chunk)
    return SplitPlan(segments, chunk, 0, 0) if segments > 1 else NO_SPLIT


def capped_plan(plan: SplitPlan, key_tiles: int, cap: int) -> SplitPlan:
    """plan with at most `cap` segments for contexts of up to key_tiles tiles: a chunked plan's
    chunks widened to cover them, the count rule's count lowered."""
    if plan.num_segments <= cap:
        return plan
    if plan.short_tiles == 0 and plan.lone_tiles == 0:   # chunked: segments of tiles_per_segment tiles
        return SplitPlan(cap, max(plan.tiles_per_segment, triton.cdiv(key_tiles, cap)), 0, 0)
    return SplitPlan(cap, plan.tiles_per_segment, plan.short_tiles, plan.lone_tiles)
