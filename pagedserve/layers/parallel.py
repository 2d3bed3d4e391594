"""Tensor- and pipeline-parallel group state and the collectives the parallel layers use.

Ranks are laid out as vLLM's: tensor-parallel inner, pipeline-parallel outer, so global rank
= pp_rank * tp_size + tp_rank; stage s holds ranks s*tp .. s*tp+tp-1. With no process group
initialised everything is rank 0 of 1 and the collectives are identity, so the same layers
serve TP=1 and TP=N. With a group but no init_model_parallel() call (PP=1), the TP group is
the default (world) group. A rank may install a faster all-reduce for the tensors it can take
(layers/custom_all_reduce.py; PP=1 only, it rendezvouses on the world group); NCCL takes the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ModelParallel:
    """This rank's place: its TP group (None: the default group) and its pipeline stage."""

    tp_group: Any
    tp_ranks: tuple[int, ...]       # global ranks of this rank's TP group, TP rank order
    pp_rank: int
    pp_size: int


_STATE: ModelParallel | None = None


def init_model_parallel(tp_size: int, pp_size: int) -> ModelParallel:
    """Create one TP group per pipeline stage (every rank takes part in creating every group,
    in the same order) and remember this rank's. Call on every rank after the default group
    exists and before the model is built."""
    global _STATE
    rank = dist.get_rank()
    if dist.get_world_size() != tp_size * pp_size:
        raise ValueError(f"world size {dist.get_world_size()} != tensor_parallel_size {tp_size} x "
                         f"pipeline_parallel_size {pp_size}")
    mine: Any = None
    for stage in range(pp_size):
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(ranks) if pp_size > 1 else None
        if rank in ranks:
            mine = ModelParallel(group, tuple(ranks), stage, pp_size)
    _STATE = mine
    return mine


def reset_model_parallel() -> None:
    global _STATE
    _STATE = None


def _tp_group() -> Any:
    return _STATE.tp_group if _STATE is not None else None


class CustomAllReduce(Protocol):
    def can_reduce(self, tensor: torch.Tensor) -> bool: ...
    def __call__(self, tensor: torch.Tensor) -> torch.Tensor: ...


_custom_all_reduce: CustomAllReduce | None = None


def set_custom_all_reduce(reducer: CustomAllReduce | None) -> None:
    """Install (or remove, None) this rank's custom all-reduce; every rank must do the same."""
    global _custom_all_reduce
    _custom_all_reduce = reducer


def tp_world_size() -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return len(_STATE.tp_ranks) if _STATE is not None else dist.get_world_size()


def tp_rank() -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return _STATE.tp_ranks.index(dist.get_rank()) if _STATE is not None else dist.get_rank()


def _model_parallel() -> ModelParallel | None:
    return _STATE if dist.is_available() and dist.is_initialized() else None


def pp_world_size() -> int:
    state = _model_parallel()
    return state.pp_size if state is not None else 1


def pp_rank() -> int:
    state = _model_parallel()
    return state.pp_rank if state is not None else 0


def is_first_stage() -> bool:
    return pp_rank() == 0


def is_last_stage() -> bool:
    return pp_rank() == pp_world_size() - 1


def stage_layers(num_layers: int, pp_size: int, stage: int) -> range:
    """The decoder layers of `stage`: an even split, the first stages taking one more when
    the layers do not divide evenly."""
    base, extra = divmod(num_layers, pp_size)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum across the TP group: the custom all-reduce's new tensor when it takes this one, else
    NCCL's in place (the input itself). Use the returned tensor."""
    if tp_world_size() > 1:
        custom = _custom_all_reduce
        if custom is not None and custom.can_reduce(tensor):
            return custom(tensor)
        dist.all_reduce(tensor, group=_tp_group())
    return tensor


def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's `tensor` into every rank's `tensor` (same shape and dtype on every rank), in place.
    World group: used with PP=1 only (async TP's sampled ids)."""
    if tp_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def gather_last_dim_to_rank0(tensor: torch.Tensor) -> torch.Tensor | None:
    """Concatenate each TP rank's slice along the last dim on TP rank 0; other ranks get None."""
    world = tp_world_size()
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    dst = _STATE.tp_ranks[0] if _STATE is not None else 0
    if tp_rank() == 0:
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.gather(tensor, parts, dst=dst, group=_tp_group())
        return torch.cat(parts, dim=-1)
    dist.gather(tensor, None, dst=dst, group=_tp_group())
    return None


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator
