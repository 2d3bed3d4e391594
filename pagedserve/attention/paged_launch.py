"""Launch shapes of the paged attention kernel (triton_paged_attention.py): the tile shape of a
launch (TileConfig: default_tile_config for decode-like and prefill-like launches) and, for the
latency-bound decode launches, the narrow tiles with their split plan (narrow_decode_launch);
a call's tiles and split plan (launch_plan), and the decode launches' variants start-up dry-runs
(decode_launch_shapes)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from pagedserve.attention.split_plan import SplitPlan, capped_plan, choose_splits, sm_count


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of one attention launch. block_m: rows of a query tile (tokens x packed
    heads), a power of two >= 16; tile_n: keys per loop step, a power of two >= 16.
    max_registers: a cap on registers a thread (Triton's maxnreg; None: the compiler's choice),
    for sweeps of the decode launch's occupancy (benchmarks/attn_gpu.py --tiles T:W:S:R)."""

    block_m: int
    tile_n: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None


def default_tile_config(queries_per_kv: int, head_dim_pad: int, max_query_len: int,
                        dtype: torch.dtype, fp8_cache: bool = False) -> TileConfig:
    """Decode-like launches (every query fits one tile) use the smallest tile that packs the
    GQA group; prefill launches use one wide tile shape (128 rows for 16-bit types) whatever
    their length, so K/V tiles are reused across tokens and a serving run meets only two
    eager kernel variants: none is JIT-compiled in the middle of a run. Decode launches over an
    FP8 cache (kv_cache_dtype) run 2 warps: H100, llama-8b heads, contexts U[300, 1300], 256 / 448
    rows 0.208 -> 0.196 / 0.326 -> 0.303 ms (the bf16 cache's: 4 warps, 2 were 1-2% slower;
    benchmarks/fp8_attn_probe.py, RESULTS.md)."""
    group = max(16, triton.next_power_of_2(queries_per_kv))
    wide = dtype != torch.float32 and head_dim_pad <= 128
    tile_n = 64 if wide else (32 if head_dim_pad <= 128 else 16)
    if max_query_len * queries_per_kv <= group:
        return TileConfig(block_m=group, tile_n=tile_n, num_warps=2 if fp8_cache and wide else 4, num_stages=3)
    block_m = max(128 if wide else 64, group)
    return TileConfig(block_m=block_m, tile_n=tile_n, num_warps=8 if block_m >= 128 else 4, num_stages=2)


# Latency-bound decode launches: all-decode, at most NARROW_MAX_PROGRAMS (sequence, KV head)
# programs, bounded by at most NARROW_MAX_SEQ_LEN keys (a decode graph's bound is max_model_len),
# 16-bit types at head_dim <= 128: NARROW_TILE_N-key tiles, 2 stages, one tile a segment up to
# the count rule's 512 keys (split_plan.SHORT_TILES of 64-key tiles) and lone up to its 128.
# H200, llama-8b heads (32 / 8 / 128), the kernel alone at bound 2048, one row (attn_gpu.py
# --stages tail, benchmarks/RESULTS.md session 24): 129 keys 6.8 -> 6.0 us, 401 keys 7.8 -> 6.4,
# 1,025 keys 9.9 -> 9.6 (64-key tiles: fewer, longer segments were slower still: 1 x 8 tiles
# 13.9 us at 401 keys). Not measured past one row or a bound of 2048: hence the caps.
NARROW_TILE_N = 32
NARROW_MAX_PROGRAMS = 32
NARROW_MAX_SEQ_LEN = 2048


def narrow_decode_launch(num_seqs: int, num_kv_heads: int, queries_per_kv: int, head_dim_pad: int,
                         max_query_len: int, max_seq_len: int, dtype: torch.dtype, num_heads: int,
                         device: torch.device) -> tuple[TileConfig, SplitPlan] | None:
    """The launch shape and split plan of a latency-bound decode launch (above), or None where
    the default ones apply."""
    if (max_query_len != 1 or num_seqs * num_kv_heads > NARROW_MAX_PROGRAMS or max_seq_len > NARROW_MAX_SEQ_LEN
            or dtype == torch.float32 or head_dim_pad > 128):
        return None
    plan = choose_splits(num_seqs, num_kv_heads, 1, max_seq_len, NARROW_TILE_N, sm_count(device), num_heads,
                         head_dim_pad)
    if plan.num_segments > 1:   # the count rule's thresholds are in 64-key tiles
        scale = 64 // NARROW_TILE_N
        plan = SplitPlan(plan.num_segments, plan.tiles_per_segment, plan.short_tiles * scale,
                         plan.lone_tiles * scale)
    group = max(16, triton.next_power_of_2(queries_per_kv))
    return TileConfig(block_m=group, tile_n=NARROW_TILE_N, num_warps=4, num_stages=2), plan


# Cascade launches (attention/triton_cascade: the decode launch after the prefix launch, where the rows
# sharing the prefix read only their own keys, a few tiles each): 32-key tiles, 2 stages (more programs an
# SM), and at most CASCADE_MAX_SEGMENTS segments (a graph's chunked plan for max_model_len 32768 at 256
# rows has 15, 14 of which exit at once for every such row). H100, prefix256's shape (256 rows, llama-8b
# heads; benchmarks/cascade_kernels.py, RESULTS.md session 53): that decode launch ~98 us a layer under
# the default tiles and plan; 32-key tiles and 2 stages -14 us, no split at all -21 us; these tiles and
# 4 segments: ~70 us (the cascade 118.6 us with its prefix launch, no split 115.1; the plain launch 453).
CASCADE_MAX_SEGMENTS = 4


def launch_plan(num_seqs: int, num_heads: int, num_kv_heads: int, head_dim_pad: int, max_query_len: int,
                max_seq_len: int, dtype: torch.dtype, device: torch.device,
                num_splits: int | SplitPlan | None = None, tiles: TileConfig | None = None,
                cascade: bool = False) -> tuple[TileConfig | None, SplitPlan, bool]:
    """paged_attention's tiles (None: each launch's default_tile_config), split plan, and whether
    it is a narrow (latency-bound decode) launch. cascade: a cascade's decode launch (above; never
    narrow)."""
    queries_per_kv = num_heads // num_kv_heads
    if cascade and tiles is None:
        wide = dtype != torch.float32 and head_dim_pad <= 128
        tiles = TileConfig(block_m=max(16, triton.next_power_of_2(queries_per_kv)), tile_n=32 if wide else 16,
                           num_warps=4, num_stages=2)
    narrow = None if num_splits is not None or tiles is not None else narrow_decode_launch(
        num_seqs, num_kv_heads, queries_per_kv, head_dim_pad, max_query_len, max_seq_len, dtype, num_heads, device)
    if narrow is not None:
        return *narrow, True
    if num_splits is None:
        default = tiles or default_tile_config(queries_per_kv, head_dim_pad, max_query_len, dtype)
        plan = choose_splits(num_seqs, num_kv_heads, max_query_len, max_seq_len, default.tile_n,
                             sm_count(device), num_heads, head_dim_pad)
        if cascade:
            plan = capped_plan(plan, triton.cdiv(max_seq_len, default.tile_n), CASCADE_MAX_SEGMENTS)
        return tiles, plan, False
    return tiles, num_splits if isinstance(num_splits, SplitPlan) else SplitPlan(num_splits), False


def decode_launch_shapes(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                         device: torch.device, max_rows: int, min_seq_len: int, max_seq_len: int,
                         cascade: bool = False, min_rows: int = 1) -> list[tuple[int, int]]:
    """(decode rows, longest sequence of the step) for each kernel specialisation a decode
    launch without rotary can take (its tiles, split or not) with 1..max_rows rows and a longest
    sequence in [min_seq_len, max_seq_len]: the decode rows of mixed steps (and of all-decode
    steps past TritonBackend.fused_decode_max_seqs), which the decode graphs (rotary inside
    their launch) do not compile. Start-up dry-runs one step of each (worker/profile_run.py):
    else the first mixed step of each compiles it (session 29: a machine's first thr512 process,
    cold Triton cache, stalled 1.0-1.6 s in one step; one after an attention benchmark had
    compiled these launches did not). cascade: those of the cascade's decode launch (launch_plan's
    cascade tiles and plan) for min_rows..max_rows rows."""
    head_dim_pad = triton.next_power_of_2(head_dim)
    bounds, bound = [], max(min_seq_len, 1)
    while bound < max_seq_len:
        bounds.append(bound)
        bound *= 2
    bounds.append(max_seq_len)
    shapes: dict[tuple[TileConfig, bool], tuple[int, int]] = {}
    # every count up to 64 (narrow launches: <= 32 programs), then every 8th: past 64 rows the
    # split / no-split regions are each wider than that
    for rows in sorted({*range(1, min(max_rows, 64) + 1), *range(64, max_rows + 1, 8), max_rows}):
        if rows < min_rows:
            continue
        for bound in bounds:
            tiles, plan, _ = launch_plan(rows, num_heads, num_kv_heads, head_dim_pad, 1, bound, dtype, device,
                                         cascade=cascade)
            tiles = tiles or default_tile_config(num_heads // num_kv_heads, head_dim_pad, 1, dtype)
            shapes.setdefault((tiles, plan.num_segments > 1), (rows, bound))
    return list(shapes.values())
