"""Tensor-parallel group state and the collectives the parallel layers use.

With no process group initialised everything is rank 0 of 1 and the collectives are
identity, so the same layers serve TP=1 and TP=N. A rank may install a faster all-reduce for
the tensors it can take (layers/custom_all_reduce.py); NCCL takes the rest.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist


class CustomAllReduce(Protocol):
    def can_reduce(self, tensor: torch.Tensor) -> bool: ...
    def __call__(self, tensor: torch.Tensor) -> torch.Tensor: ...


_custom_all_reduce: CustomAllReduce | None = None


def set_custom_all_reduce(reducer: CustomAllReduce | None) -> None:
    """Install (or remove, None) this rank's custom all-reduce; every rank must do the same."""
    global _custom_all_reduce
    _custom_all_reduce = reducer


def tp_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum across ranks: the custom all-reduce's new tensor when it takes this one, else NCCL's
    in place (the input itself). Use the returned tensor."""
    if tp_world_size() > 1:
        custom = _custom_all_reduce
        if custom is not None and custom.can_reduce(tensor):
            return custom(tensor)
        dist.all_reduce(tensor)
    return tensor


def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's `tensor` into every rank's `tensor` (same shape and dtype on every rank), in place."""
    if tp_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def gather_last_dim_to_rank0(tensor: torch.Tensor) -> torch.Tensor | None:
    """Concatenate each rank's slice along the last dim on rank 0; other ranks get None."""
    world = tp_world_size()
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    if tp_rank() == 0:
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.gather(tensor, parts, dst=0)
        return torch.cat(parts, dim=-1)
    dist.gather(tensor, None, dst=0)
    return None


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator
