"""Torch reference attention over the paged KV cache (CPU backend, and the oracle that the
Triton kernels are tested against).

KV layout per layer: k_cache, v_cache of shape [num_blocks, block_size, num_kv_heads, head_dim];
slot = block_id * block_size + offset.
"""
from __future__ import annotations

from functools import cache
from typing import Callable

import torch
import torch.nn.functional as F


FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def _to_fp8(x: torch.Tensor, fp8: torch.dtype) -> torch.Tensor:
    """x in an FP8 type, saturating at its largest finite value (never NaN or inf), as the GPU's
    conversion does (triton_store_kv.to_cache)."""
    bound = FP8_MAX[fp8]
    return x.clamp(-bound, bound).to(fp8)


def to_cache(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """x in the cache's element type, viewed as the cache's storage for index_copy_ (an FP8
    cache as bytes: the CPU has no FP8 index_copy_)."""
    if cache.dtype not in FP8_MAX:
        return x.to(cache.dtype)
    return _to_fp8(x, cache.dtype).view(torch.uint8)


def as_cached(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """x as an FP8 cache of `cache_dtype` holds it, back in x's dtype (x itself for other caches):
    the new tokens' K/V that a prefill kernel reads from the step's tensors, so that every key is
    the cache's (as vLLM's attention reads every key from the cache)."""
    return _to_fp8(x, cache_dtype).to(x.dtype) if cache_dtype in FP8_MAX else x


def _rows(cache: torch.Tensor) -> torch.Tensor:
    """The cache as [slots, heads, head_dim] of its storage type (an FP8 cache as bytes)."""
    flat = cache.view(-1, *cache.shape[2:])
    return flat.view(torch.uint8) if cache.dtype in FP8_MAX else flat


def store_kv_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into the cache at slot_mapping;
    slots of -1 are skipped. Mutates k_cache and v_cache in place."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    _rows(k_cache).index_copy_(0, slot_mapping, to_cache(key, k_cache))
    _rows(v_cache).index_copy_(0, slot_mapping, to_cache(value, v_cache))


def _gather_context(cache: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """[num_seqs, max_seq_len, num_kv_heads, head_dim] gathered through the block tables."""
    num_seqs = block_tables.shape[0]
    block_size = cache.shape[1]
    num_blocks = (max_seq_len + block_size - 1) // block_size
    index = block_tables[:, :num_blocks].reshape(-1).long()
    gathered = cache.index_select(0, index)   # [S * nb, B, H, D]; much faster than cache[index] on CPU
    return gathered.view(num_seqs, num_blocks * block_size, *cache.shape[2:])[:, :max_seq_len]


def _attend_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, query_lens: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """Padded attention for a group of sequences; q is [S, Qmax, Hq, D]; returns the same shape."""
    num_seqs, max_q, num_heads, _ = q.shape
    max_seq_len = int(seq_lens.max())
    k = _gather_context(k_cache, block_tables, max_seq_len)
    v = _gather_context(v_cache, block_tables, max_seq_len)
    key_pos = torch.arange(max_seq_len, device=q.device)
    query_pos = (seq_lens - query_lens)[:, None] + torch.arange(max_q, device=q.device)[None, :]
    mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < seq_lens[:, None, None])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
        attn_mask=mask[:, None], scale=scale, enable_gqa=k.shape[2] != num_heads)
    return out.transpose(1, 2)


def paged_attention_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor,
                        query_start_loc: torch.Tensor, scale: float,
                        num_decodes: int | None = None) -> torch.Tensor:
    """Attention for a ragged mixed batch. query: [num_tokens, num_heads, head_dim] with the
    K/V of these tokens already stored in the cache. Returns [num_tokens, num_heads, head_dim].

    Sequences with one query token (decodes) are attended in one padded call; each longer
    chunk gets its own call, so padding never multiplies a long chunk by the batch size.
    """
    num_tokens = query.shape[0]
    out = torch.empty_like(query)
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    seq_lens = seq_lens.to(query_lens.dtype)
    if num_decodes is None:
        num_decodes = int((query_lens == 1).cumprod(0).sum()) if query_lens.numel() else 0
    if num_decodes:
        dq = query[:num_decodes].unsqueeze(1)
        out[:num_decodes] = _attend_group(dq, k_cache, v_cache, block_tables[:num_decodes],
                                          seq_lens[:num_decodes], query_lens[:num_decodes], scale)[:, 0]
    starts = query_start_loc.tolist()
    for s in range(num_decodes, seq_lens.shape[0]):
        lo, hi = starts[s], starts[s + 1]
        if hi == lo:
            continue
        out[lo:hi] = _attend_group(query[lo:hi].unsqueeze(0), k_cache, v_cache, block_tables[s:s + 1],
                                   seq_lens[s:s + 1], query_lens[s:s + 1], scale)[0]
    assert starts[-1] <= num_tokens
    return out


# Chunks of at least this many tokens take chunk_attention on the CPU; shorter ones one masked
# call: 2 cores, 9 query heads over 3: a 128-token chunk after 1,024 cached 4.0 ms either way,
# 256 after 2,048 15.8 ms masked, 12.8 ms split (benchmarks/RESULTS.md, session 58).
CHUNK_SPLIT_MIN_QUERY = 256


@cache
def cpu_flash_with_lse() -> Callable | None:
    """torch's CPU flash attention that also returns the log-sum-exp, taking fewer K/V heads
    than query heads, or None where this torch's lacks either."""
    try:
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        q, kv = torch.zeros(1, 2, 2, 8), torch.zeros(1, 1, 2, 8)
        op(q, kv, kv, is_causal=True)
    except (AttributeError, RuntimeError):
        return None
    return op


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    flash: Callable) -> torch.Tensor:
    """One sequence's prefill chunk: q [1, L, Hq, D], k/v [1, S, Hkv, D] (S >= L; the last L
    rows are the chunk's own keys) -> [1, L, Hq, D]. Two flash calls with no mask, merged by
    their log-sum-exp: the chunk's own keys causal (top-left is right: L == L) and the S - L
    keys before them whole (as sdpa_prefill splits a long chunk on CUDA; that module needs
    Triton). The same attention as the masked call, in fewer FLOPs: the masked
    call runs every block, a mask per block (a 2,048-token chunk after 5,752 cached tokens on
    2 cores: 0.30 s masked, 0.21 s split; benchmarks/RESULTS.md, session 58)."""
    context = k.shape[1] - q.shape[1]
    qt = q.transpose(1, 2)
    o_new, lse_new = flash(qt, k[:, context:].transpose(1, 2), v[:, context:].transpose(1, 2), is_causal=True,
                           scale=scale)
    if not context:
        return o_new.transpose(1, 2)
    o_ctx, lse_ctx = flash(qt, k[:, :context].transpose(1, 2), v[:, :context].transpose(1, 2), scale=scale)
    # the new part's share of the softmax: exp(lse_new) / (exp(lse_new) + exp(lse_ctx))
    share = torch.sigmoid(lse_new - lse_ctx).unsqueeze(-1)
    return torch.lerp(o_ctx.float(), o_new.float(), share).to(q.dtype).transpose(1, 2)


class StepPlan:
    """What paged_attention_ref and store_kv_ref derive from the step's metadata, derived
    once per step instead of once per layer: the valid slots, and per group of sequences
    (the decodes together, then each longer chunk) its token rows, the cache rows to gather
    and the attention mask. The same attention as the functions above; on the CPU a chunk of
    CHUNK_SPLIT_MIN_QUERY tokens or more takes chunk_attention (no mask) where torch has the op."""

    def __init__(self, block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                 slot_mapping: torch.Tensor, num_decodes: int, block_size: int) -> None:
        valid = slot_mapping >= 0
        self.slots = slot_mapping if bool(valid.all()) else slot_mapping[valid]
        self.valid = None if self.slots is slot_mapping else valid
        query_lens = query_start_loc[1:] - query_start_loc[:-1]
        seq_lens = seq_lens.to(query_lens.dtype)
        starts = query_start_loc.tolist()
        self.num_decodes = num_decodes
        self.groups: list[tuple[int, int, torch.Tensor, int, int, torch.Tensor]] = []
        if num_decodes:
            self._add(0, num_decodes, num_decodes, block_tables[:num_decodes], seq_lens[:num_decodes],
                      query_lens[:num_decodes], block_size)
        for s in range(num_decodes, seq_lens.shape[0]):
            lo, hi = starts[s], starts[s + 1]
            if hi > lo:
                self._add(lo, hi, 1, block_tables[s:s + 1], seq_lens[s:s + 1], query_lens[s:s + 1], block_size)

    def _add(self, lo: int, hi: int, num_seqs: int, block_tables: torch.Tensor, seq_lens: torch.Tensor,
             query_lens: torch.Tensor, block_size: int) -> None:
        max_q = (hi - lo) // num_seqs
        max_seq_len = int(seq_lens.max())
        num_blocks = (max_seq_len + block_size - 1) // block_size
        index = block_tables[:, :num_blocks].reshape(-1).long()
        if max_q >= CHUNK_SPLIT_MIN_QUERY and seq_lens.device.type == "cpu" and cpu_flash_with_lse() is not None:
            self.groups.append((lo, hi, index, num_seqs, max_seq_len, None))   # one chunk: chunk_attention
            return
        key_pos = torch.arange(max_seq_len, device=seq_lens.device)
        query_pos = (seq_lens - query_lens)[:, None] + torch.arange(max_q, device=seq_lens.device)[None, :]
        mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < seq_lens[:, None, None])
        self.groups.append((lo, hi, index, num_seqs, max_seq_len, mask[:, None]))

    def store(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        if self.valid is not None:
            key, value = key[self.valid], value[self.valid]
        _rows(k_cache).index_copy_(0, self.slots, to_cache(key, k_cache))
        _rows(v_cache).index_copy_(0, self.slots, to_cache(value, v_cache))

    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
               skip_decodes: bool = False) -> torch.Tensor:
        """The step's attention, [T, Hq, D] like query; with skip_decodes, query and the result
        hold only the rows after the decodes (their attention is the caller's)."""
        out = torch.empty_like(query)
        num_heads = query.shape[1]
        first = self.num_decodes if skip_decodes else 0
        for lo, hi, index, num_seqs, max_seq_len, mask in (self.groups[1:] if first else self.groups):
            lo, hi = lo - first, hi - first
            q = query[lo:hi].view(num_seqs, (hi - lo) // num_seqs, *query.shape[1:])
            k = k_cache.index_select(0, index).view(num_seqs, -1, *k_cache.shape[2:])[:, :max_seq_len]
            v = v_cache.index_select(0, index).view(num_seqs, -1, *v_cache.shape[2:])[:, :max_seq_len]
            if mask is None:
                o = chunk_attention(q, k.to(q.dtype), v.to(q.dtype), scale, cpu_flash_with_lse())
                out[lo:hi] = o.reshape(hi - lo, *query.shape[1:])
                continue
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
                attn_mask=mask, scale=scale, enable_gqa=k.shape[2] != num_heads)
            out[lo:hi] = o.transpose(1, 2).reshape(hi - lo, *query.shape[1:])
        return out
