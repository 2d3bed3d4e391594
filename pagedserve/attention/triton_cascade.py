"""Cascade attention for decode steps whose rows share a cached prefix (a system prompt, n > 1
samples): the shared keys are read once a step for all those rows, not once a row.

A decode row's keys are [0, seq_len). Where many rows of a step hold the same block ids for
their first blocks (prefix caching shares them), positions [0, P) hold the same keys and values
for each of them: cascade_plan.shared_prefix finds such groups of rows (up to CASCADE_MAX_GROUPS:
several system prompts), each group's P (cascade_len[s] = P for its rows, 0 for the others) and
its members, listed group after group (cascade_rows, with the groups' bounds in cascade_groups);
P is at most each such row's seq_len - 1, so the row's new key (stored by the decode launch) lies
past it, and any member's block table holds the prefix. Per layer:
1. this module's launch: a group's query heads of one KV head form query tiles (members x
   queries per KV head, as a prefill tile packs tokens x heads; each group's members in tiles
   of their own) against its prefix's keys: a dense, matmul-shaped pass whose K / V tiles each
   serve BLOCK_M query rows, split over `num_segments` slices of the prefix; each (row, head,
   slice) writes un-normalised fp32 partials (acc, running max, running sum; the log2 domain of
   triton_paged_attention's online softmax);
2. the decode launch (triton_paged_attention, CASCADE) reads only keys [cascade_len[s], seq_len)
   of each row, and its segment 0 starts from the row's prefix partials instead of from nothing:
   the online softmax continued, so the split merge after it is unchanged.
In the fused decode launch (rotary_store) the query is rotated here as that launch rotates it (the
same rotate_rows at the row's position seq_len - 1: the same bits), since it rotates its own copy.
The decode rows of a mixed step (and of an all-decode step past the fused launch's rows) come
rotated, their keys stored: the same two launches, without the rotation, in a paged_attention
call of their own (the step's other rows keep their usual launch).

Other rows (cascade_len 0, a graph's padding rows among them) read their whole context in the
decode launch as without a cascade. The lengths and groups are device values (no group: no
cascade, this launch exits at once), so one CUDA graph serves every prefix; the model runner
captures such graphs beside the plain ones (worker/cuda_graph.py) and replays them when P > 0.

At 256 rows of llama-8b sharing a 2,048-token prefix (peers_long.py's prefix256) a step's
attention reads 256 x 2,112 keys (69 GB) without the cascade; with it ~0.3 GB of prefix (each
K / V tile from the L2 for its query tiles) plus the rows' own 64-192 keys.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.attention.split_plan import sm_count
from pagedserve.attention.triton_kv_tile import load_kv_tile, online_softmax_step
from pagedserve.layers.triton_ops import _LIBDEVICE, rotate_rows

# The prefix launch's tiles: query rows (rows x queries per KV head) a program, keys a step, warps, pipeline
# stages, and about how many programs an SM the prefix's slices make. H100, prefix256's shape (256 rows, llama-8b
# heads, 2,048 keys; benchmarks/cascade_kernels.py, RESULTS.md session 53), us a layer: session 52's 64 / 64 /
# 4 warps / 2 stages / 2 programs an SM 69.7-70.7; 3 stages 63.0-64.9 (4: 63.8-66.2); 3 stages and 1 program an
# SM (2 slices of 1,024 keys: 256 programs, one wave at 2 resident an SM) 47.6-49.1. 128-row tiles (4 or 8 warps,
# 2 or 3 stages), 128-key tiles or 4 programs an SM: 73-104. Block ids loaded a step ahead: no gain.
BLOCK_M = 64
TILE_N = 64
NUM_WARPS = 4
NUM_STAGES = 3
PROGRAMS_PER_SM = 1


@triton.jit(do_not_specialize=["num_segments", "stride_block_table"])
def _cascade_prefix_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr,
    query_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, cascade_len_ptr, cascade_rows_ptr,
    cascade_groups_ptr, cos_ptr, sin_ptr, num_segments, scale_log2,
    stride_q_token, stride_q_head, stride_block_table,
    stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head, stride_cos,
    NUM_HEADS: tl.constexpr, QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LIBDEVICE: tl.constexpr, MAX_GROUPS: tl.constexpr, ROTATE: tl.constexpr = True,
):
    kv_head, tile, segment = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ROWS: tl.constexpr = BLOCK_M // QUERIES_PER_KV
    # this program's group and its ROWS members from `begin` (each group's tiles after the ones before it)
    offs_g = tl.arange(0, MAX_GROUPS)
    group_lo = tl.load(cascade_groups_ptr + offs_g)
    group_hi = tl.load(cascade_groups_ptr + offs_g + 1)
    group_tiles = (group_hi - group_lo + ROWS - 1) // ROWS
    tiles_after = tl.cumsum(group_tiles, 0)
    mine = (tile < tiles_after) & (tile >= tiles_after - group_tiles)
    if tl.max(mine.to(tl.int32), 0) == 0:   # a spare tile (or no group this step)
        return
    begin = tl.sum(tl.where(mine, group_lo + (tile - tiles_after + group_tiles) * ROWS, 0), 0)
    end = tl.sum(tl.where(mine, group_hi, 0), 0)
    prefix_row = tl.load(cascade_rows_ptr + begin)   # every member's table holds the prefix's blocks
    prefix_len = tl.load(cascade_len_ptr + prefix_row)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, TILE_N)
    member = begin + offs_m // QUERIES_PER_KV
    head = kv_head * QUERIES_PER_KV + offs_m % QUERIES_PER_KV
    lane = (offs_m < ROWS * QUERIES_PER_KV) & (member < end)
    row = tl.load(cascade_rows_ptr + member, mask=lane, other=0)
    seq_len = tl.load(seq_lens_ptr + row, mask=lane, other=0)
    row_valid = lane & (seq_len > prefix_len)
    q_rows = query_ptr + row.to(tl.int64)[:, None] * stride_q_token + head[:, None] * stride_q_head
    q = tl.load(q_rows + offs_d[None, :], mask=row_valid[:, None], other=0.0)
    if ROTATE:   # the query at its position seq_len - 1, rotated as the fused decode launch rotates it
        HALF: tl.constexpr = HEAD_DIM // 2
        partner_d = offs_d ^ HALF
        sign = tl.where(offs_d < HALF, -1.0, 1.0)
        pos = tl.maximum(seq_len - 1, 0)
        rot = pos[:, None] * stride_cos + offs_d[None, :]
        cos_rows = tl.load(cos_ptr + rot).to(tl.float32)
        sin_rows = tl.load(sin_ptr + rot).to(tl.float32)
        q_partner = tl.load(q_rows + partner_d[None, :], mask=row_valid[:, None], other=0.0)
        q = rotate_rows(q, q_partner, cos_rows, sin_rows, sign[None, :], LIBDEVICE)

    num_tiles = tl.cdiv(prefix_len, TILE_N)
    tile_lo = segment * num_tiles // num_segments
    tile_hi = (segment + 1) * num_tiles // num_segments
    block_table_ptr = block_tables_ptr + prefix_row.to(tl.int64) * stride_block_table
    k_head_ptr = k_cache_ptr + kv_head.to(tl.int64) * stride_k_head
    v_head_ptr = v_cache_ptr + kv_head.to(tl.int64) * stride_v_head
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dim_valid = offs_d < HEAD_DIM   # (all: a power of two)
    for t in range(tile_lo, tile_hi):   # the decode launch's own tile loads and softmax step
        key_pos = t * TILE_N + offs_n
        key_valid = key_pos < prefix_len
        block_id = tl.load(block_table_ptr + key_pos // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        k, v = load_kv_tile(k_head_ptr, v_head_ptr, block_id, key_pos, key_valid, offs_d, dim_valid,
                            stride_k_block, stride_k_slot, stride_v_block, stride_v_slot, BLOCK_SIZE)
        m_i, l_i, acc = online_softmax_step(q, k, v, row_valid[:, None] & key_valid[None, :], m_i, l_i, acc,
                                            scale_log2, DOT_PRECISION)
    part = (row.to(tl.int64) * NUM_HEADS + head) * num_segments + segment
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_valid[:, None])
    tl.store(part_max_ptr + part, m_i, mask=row_valid)
    tl.store(part_sum_ptr + part, l_i, mask=row_valid)


@triton.jit
def merge_prefix(m_i, l_i, acc, part_acc_ptr, part_max_ptr, part_sum_ptr, token, head, row_valid, num_segments,
                 NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """The decode launch's running (max, sum, acc) of its rows continued with their prefix
    partials (every slice of _cascade_prefix_kernel's), as if its loop had read those keys."""
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    first = (token * NUM_HEADS + head) * num_segments
    for s in range(num_segments):
        m_s = tl.load(part_max_ptr + first + s, mask=row_valid, other=float("-inf"))
        l_s = tl.load(part_sum_ptr + first + s, mask=row_valid, other=0.0)
        a_s = tl.load(part_acc_ptr + (first + s)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=row_valid[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        beta = tl.math.exp2(m_s - m_safe)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m_i = m_new
    return m_i, l_i, acc


def prefix_segments(num_rows: int, num_kv_heads: int, queries_per_kv: int, device: torch.device) -> int:
    """Slices of the prefix a launch of `num_rows` rows splits over: about PROGRAMS_PER_SM programs an SM."""
    programs = num_kv_heads * triton.cdiv(num_rows, BLOCK_M // queries_per_kv)
    return max(1, min(16, triton.cdiv(PROGRAMS_PER_SM * sm_count(device), programs)))


def cascade_prefix(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   seq_lens: torch.Tensor, cascade: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                   cos_cache: torch.Tensor | None, sin_cache: torch.Tensor | None,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Step 1 above for an all-decode batch (query [rows, Hq, D], row s at position seq_lens[s] - 1:
    unrotated where cos_cache / sin_cache are given, as the fused decode launch takes it; rotated
    already where they are None, as a mixed step's decode rows are). cascade (int32, on the device;
    cascade_plan.shared_prefix's arrays): each row's shared keys ([>= rows]: its group's P, 0
    outside the groups), the groups' members ([>= rows]) and the groups' bounds in them ([2^k + 1];
    all equal: no cascade this step). Returns the prefix partials (acc [rows * Hq * segments, D],
    max and sum [rows * Hq * segments], fp32) and their segment count."""
    rows, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    queries_per_kv = num_heads // num_kv_heads
    cascade_len, cascade_rows, cascade_groups = cascade
    max_groups = cascade_groups.shape[0] - 1
    if head_dim & (head_dim - 1) or queries_per_kv > BLOCK_M or cascade_len.shape[0] < rows \
            or cascade_rows.shape[0] < rows or max_groups < 1 or max_groups & (max_groups - 1) \
            or any(t.dtype != torch.int32 for t in cascade):
        raise ValueError(f"cascade_prefix: a power-of-two head_dim, at most {BLOCK_M} query heads a KV head, int32 "
                         f"cascade lengths and members a row and 2^k + 1 int32 group bounds needed; got query "
                         f"{tuple(query.shape)}, {[(tuple(t.shape), t.dtype) for t in cascade]}")
    segments = prefix_segments(rows, num_kv_heads, queries_per_kv, query.device)
    n = rows * num_heads * segments
    acc = torch.empty(n, head_dim, dtype=torch.float32, device=query.device)
    running_max = torch.empty(n, dtype=torch.float32, device=query.device)
    running_sum = torch.empty(n, dtype=torch.float32, device=query.device)
    # each group's members in tiles of their own: at most max_groups - 1 more tiles than the rows fill
    grid = (num_kv_heads, triton.cdiv(rows, BLOCK_M // queries_per_kv) + max_groups - 1, segments)
    rotate = cos_cache is not None
    _cascade_prefix_kernel[grid](
        acc, running_max, running_sum, query, k_cache, v_cache, block_tables, seq_lens, cascade_len, cascade_rows,
        cascade_groups, cos_cache if rotate else query, sin_cache if rotate else query, segments,
        scale * 1.4426950408889634,
        query.stride(0), query.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), cos_cache.stride(0) if rotate else 0,
        NUM_HEADS=num_heads, QUERIES_PER_KV=queries_per_kv, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=BLOCK_M, TILE_N=TILE_N, DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        LIBDEVICE=_LIBDEVICE, MAX_GROUPS=max_groups, ROTATE=rotate, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return acc, running_max, running_sum, segments
