"""Attention backends: the torch reference (any device) and the Triton kernels (CUDA).
A backend stores K/V by slot mapping and attends over the paged cache."""
from __future__ import annotations

import logging
from typing import Protocol

import torch

from pagedserve.attention.metadata import AttentionMetadata
from pagedserve.attention.torch_ref import StepPlan, store_kv_ref

logger = logging.getLogger(__name__)


class AttentionBackend(Protocol):
    name: str

    def store_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None: ...

    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> torch.Tensor: ...


class TorchBackend:
    """The torch reference; what the layers share of a step (valid slots, gather indices,
    masks) is planned once per step (StepPlan, keyed by the step's metadata object) and
    reused by every layer."""

    name = "torch"

    def __init__(self) -> None:
        self._meta: AttentionMetadata | None = None
        self._plan: StepPlan | None = None

    def _plan_for(self, meta: AttentionMetadata, block_size: int) -> StepPlan:
        if meta is not self._meta:
            self._plan = StepPlan(meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.slot_mapping,
                                  meta.num_decodes, block_size)
            self._meta = meta
        return self._plan

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping, meta: AttentionMetadata | None = None) -> None:
        if meta is None or slot_mapping is not meta.slot_mapping:
            store_kv_ref(key, value, k_cache, v_cache, slot_mapping)
            return
        self._plan_for(meta, k_cache.shape[1]).store(key, value, k_cache, v_cache)

    def attend(self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        return self._plan_for(meta, k_cache.shape[1]).attend(query, k_cache, v_cache, scale)


class TritonBackend:
    name = "triton"

    def __init__(self) -> None:
        from pagedserve.attention.triton_paged_attention import paged_attention
        from pagedserve.attention.triton_store_kv import store_kv
        self._store_kv = store_kv
        self._paged_attention = paged_attention

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        self._store_kv(key, value, k_cache, v_cache, slot_mapping)

    def attend(self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        return self._paged_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                     meta.query_start_loc, scale, meta.max_query_len, meta.max_seq_len,
                                     num_decodes=meta.num_decodes)


def select_backend(device: torch.device) -> AttentionBackend:
    """Triton on CUDA, the torch reference elsewhere."""
    if device.type == "cuda":
        return TritonBackend()
    return TorchBackend()
