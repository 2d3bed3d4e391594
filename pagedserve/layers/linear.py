"""Megatron-style linear layers. Each parameter owns a `weight_loader(param, loaded, shard_id)`
that copies only this rank's shard; `loaded` may be a tensor or a lazy safetensors slice
(only the slice is read from disk).

    ColumnParallelLinear   weight [out / tp, in]     output stays sharded
    MergedColumnParallel   [gate; up] stacked on dim 0, each sharded
    QKVParallelLinear      [q; k; v]; KV heads replicated when num_kv_heads < tp
    RowParallelLinear      weight [out, in / tp]     all-reduce of the partial sums
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.layers.parallel import all_reduce, divide, tp_rank, tp_world_size


# Decode-sized batches (at most this many rows) of bf16/fp16 on CUDA go through the Triton
# gemv (layers/triton_gemv.py) where it streams the weights faster than cuBLAS
# (benchmarks/gemv_sweep.py); 0 turns it off (A/B measurements). The runner sets it from
# DeviceConfig.gemv_max_rows when it loads the model.
GEMV_MAX_ROWS = 16


def set_gemv_max_rows(rows: int) -> None:
    global GEMV_MAX_ROWS
    GEMV_MAX_ROWS = rows


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias): the Triton gemv for few rows of a large weight on CUDA, else F.linear."""
    if bias is None and x.shape[0] <= GEMV_MAX_ROWS and x.is_cuda:
        from pagedserve.layers.triton_gemv import gemv, use_gemv
        if use_gemv(x, weight, GEMV_MAX_ROWS):
            return gemv(x, weight)
    return F.linear(x, weight, bias)


def narrow(loaded: Any, dim: int, start: int, size: int) -> torch.Tensor:
    """Slice a tensor or a safetensors slice along `dim` and return a tensor."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = [slice(None)] * len(loaded.get_shape())
    index[dim] = slice(start, start + size)
    return loaded[tuple(index)]


def as_tensor(loaded: Any) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def _copy(param: torch.Tensor, data: torch.Tensor) -> None:
    if param.shape != data.shape:
        raise ValueError(f"weight shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(data.shape)}")
    param.data.copy_(data.to(param.dtype))


def default_weight_loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
    _copy(param, as_tensor(loaded))


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        self.tp_size, self.tp_rank = tp_world_size(), tp_rank()
        super().__init__(in_features, divide(out_features, self.tp_size, "output features"), bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        size = param.shape[0]
        _copy(param, narrow(loaded, 0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stacked (gate and up); shard_id indexes `output_sizes`."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        shard_size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        _copy(param.data.narrow(0, offset, shard_size), narrow(loaded, 0, self.tp_rank * shard_size, shard_size))


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matmul. Query heads are split across ranks; KV heads
    too when there are at least tp of them, otherwise each rank holds a replica of the KV
    head its query heads use."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32) -> None:
        tp = tp_world_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp, "num_attention_heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = divide(num_kv_heads, tp, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = divide(tp, num_kv_heads, "tensor_parallel_size over num_key_value_heads")
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, start = 0, q_size, self.tp_rank * q_size
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, start = kv_size, (self.tp_rank // self.kv_replicas) * kv_size
        _copy(param.data.narrow(0, offset, size), narrow(loaded, 0, start, size))


class RowParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, reduce_results: bool = True) -> None:
        self.tp_size, self.tp_rank = tp_world_size(), tp_rank()
        self.reduce_results = reduce_results
        super().__init__(divide(in_features, self.tp_size, "input features"), out_features, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if param.dim() == 1:   # bias is not sharded; added once, after the reduction
            _copy(param, as_tensor(loaded))
            return
        size = param.shape[1]
        _copy(param, narrow(loaded, 1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight)
        if self.reduce_results and self.tp_size > 1:
            out = all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out
