"""Attention backends: the torch reference (any device) and the Triton kernels (CUDA).
A backend stores K/V by slot mapping and attends over the paged cache."""
from __future__ import annotations

import logging
from typing import Protocol

import torch

from pagedserve.attention.metadata import AttentionMetadata
from pagedserve.attention.torch_ref import paged_attention_ref, store_kv_ref

logger = logging.getLogger(__name__)


class AttentionBackend(Protocol):
    name: str

    def store_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None: ...

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        """query [T, Hq, D]; key/value [T, Hkv, D] are this step's (already stored in the cache)."""


class TorchBackend:
    name = "torch"

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        store_kv_ref(key, value, k_cache, v_cache, slot_mapping)

    def attend(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        return paged_attention_ref(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                   meta.query_start_loc, scale, meta.num_decodes)


class TritonBackend:
    """Decodes and short prefill chunks: the paged kernel (triton_paged_attention). A step whose
    longest chunk has at least `prefill_min_query_len` tokens sends its chunks to the
    FlashAttention-style kernel (triton_prefill_attention: new K/V read contiguous, context
    through the block table) and only its decodes to the paged kernel. The choice reads host
    ints only, so it is fixed per CUDA-graph bucket."""

    name = "triton"
    prefill_min_query_len = 256

    def __init__(self) -> None:
        from pagedserve.attention.triton_paged_attention import paged_attention
        from pagedserve.attention.triton_prefill_attention import prefill_attention
        from pagedserve.attention.triton_store_kv import store_kv
        self._store_kv = store_kv
        self._paged_attention = paged_attention
        self._prefill_attention = prefill_attention

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        self._store_kv(key, value, k_cache, v_cache, slot_mapping)

    def attend(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        num_decodes, num_seqs = meta.num_decodes, meta.num_seqs
        if meta.max_query_len < self.prefill_min_query_len or num_decodes >= num_seqs:
            return self._paged_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                         meta.query_start_loc, scale, meta.max_query_len, meta.max_seq_len,
                                         num_decodes=num_decodes)
        out = torch.empty_like(query)
        if num_decodes:  # the leading decodes alone: one token each, tokens [0, num_decodes)
            self._paged_attention(query, k_cache, v_cache, meta.block_tables[:num_decodes],
                                  meta.seq_lens[:num_decodes], meta.query_start_loc[:num_decodes + 1],
                                  scale, 1, meta.max_seq_len, num_decodes=num_decodes, out=out)
        return self._prefill_attention(query, key, value, k_cache, v_cache, meta.block_tables,
                                       meta.seq_lens, meta.query_start_loc, scale, out, num_decodes,
                                       num_seqs, query.shape[0] - num_decodes)


def select_backend(device: torch.device) -> AttentionBackend:
    """Triton on CUDA, the torch reference elsewhere."""
    if device.type == "cuda":
        return TritonBackend()
    return TorchBackend()
