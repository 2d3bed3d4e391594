"""The key-tile work the paged decode launch (triton_paged_attention) and the cascade's prefix launch
(triton_cascade) share: one tile of K and V of one KV head through per-key block ids, and the online
softmax's step over it (log2 domain, fp32)."""
from __future__ import annotations

import triton
import triton.language as tl

from pagedserve.attention.triton_store_kv import fp8_operands


@triton.jit
def load_kv_tile(k_head_ptr, v_head_ptr, block_id, key_pos, key_valid, offs_d, dim_valid,
                 stride_k_block, stride_k_slot, stride_v_block, stride_v_slot, BLOCK_SIZE: tl.constexpr):
    """One [TILE_N, HEAD_DIM_PAD] tile of K and of V of one KV head (block ids per key given)."""
    slot = key_pos % BLOCK_SIZE
    kv_mask = key_valid[:, None] & dim_valid[None, :]
    k = tl.load(k_head_ptr + block_id[:, None] * stride_k_block + slot[:, None] * stride_k_slot
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_head_ptr + block_id[:, None] * stride_v_block + slot[:, None] * stride_v_slot
                + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def online_softmax_step(q, k, v, score_mask, m_i, l_i, acc, scale_log2, DOT_PRECISION: tl.constexpr):
    """Fold one key tile into the running (max, sum, acc) of the rows of q (log2 domain, fp32);
    rows with no unmasked key so far stay at max -inf, sum 0, acc 0."""
    if k.dtype.is_fp8():   # an FP8 cache (kv_cache_dtype): fp8_operands
        q, k, v = fp8_operands(q, k, v)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    s = tl.where(score_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows stay at 0
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc
