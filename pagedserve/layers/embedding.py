"""Vocab-parallel embedding and LM head: each rank holds vocab_size / tp rows."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.layers.linear import _copy, linear, narrow
from pagedserve.layers.parallel import all_reduce, divide, gather_last_dim_to_rank0, tp_rank, tp_world_size


class VocabParallelEmbedding(nn.Module):
    """`quant_method` (None: a float `weight`) owns packed rows: a GGUF embedding method
    (layers/quantization/gguf.py) with create_weights, embed, logits and
    process_weights_after_loading."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                 quant_method: Any = None) -> None:
        super().__init__()
        self.tp_size, self.tp_rank = tp_world_size(), tp_rank()
        self.vocab_size = vocab_size
        self.shard_size = divide(vocab_size, self.tp_size, "vocab_size")
        self.vocab_start = self.tp_rank * self.shard_size
        self.quant_method = quant_method
        if quant_method is not None:
            quant_method.create_weights(self, self.shard_size, hidden_size, dtype)
            return
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        _copy(param, narrow(loaded, 0, self.vocab_start, self.shard_size))

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.embed(self, ids)
        return F.embedding(ids, self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        out = self._lookup(local.masked_fill(outside, 0))
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocab slice, gathered on rank 0 (other ranks get None)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.quant_method is not None:
            return gather_last_dim_to_rank0(self.quant_method.logits(self, hidden))
        return gather_last_dim_to_rank0(linear(hidden, self.weight))
