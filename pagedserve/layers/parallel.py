"""Tensor-parallel group state and the collectives the parallel layers use.

With no process group initialised everything is rank 0 of 1 and the collectives are
identity, so the same layers serve TP=1 and TP=N.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def tp_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum across ranks, in place; returns the tensor."""
    if tp_world_size() > 1:
        dist.all_reduce(tensor)
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
