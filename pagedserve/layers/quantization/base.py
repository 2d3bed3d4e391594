"""The per-layer quantization hook: a QuantizationConfig (what a checkpoint's
`quantization_config` says) hands each linear layer a LinearMethod, which owns that layer's
parameters, its matmul and its post-load repacking.

    LinearMethod.create_weights(layer, input_size_per_partition, output_partition_sizes,
                                input_size, output_size, params_dtype)
        registers the layer's parameters (make_param), each with the layer's weight_loader
        and the attributes that shard it for tensor parallelism:
          output_dim / output_ratio   the dim that runs over output features, and how many
                                      features one element covers (8 for int4 packed along it)
          input_dim / input_ratio     the same over input features (group size for group
                                      scales, 8 for packed int4)
          shard_indexed               one value per logical shard (q, k, v / gate, up): a
                                      per-tensor scale; loaded at index shard_id
        A column-parallel layer narrows output_dim, a row-parallel one input_dim; a split
        that cuts a pack or a group is an error naming the layer.
    LinearMethod.apply(layer, x, bias) -> y          x [T, in/tp] -> y [T, out/tp]
    LinearMethod.apply_silu_and_mul(layer, gate_up) -> y or None   the activation fused in
    LinearMethod.apply_normed(layer, x, residual, norm) -> (y, x + residual) or None   the norm
    LinearMethod.process_weights_after_loading(layer)  repack, requantize, free checkpoint
                                                       layouts; called once by the loader
    LinearMethod.checkpoint_tensors(output_size, input_size, params_dtype)
        the checkpoint tensors (suffix -> CheckpointTensor) of one logical projection at
        full size: load_format="dummy" draws random ones of these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# fused layer name -> the checkpoint projections stacked in it (ignore lists and per-layer
# schemes name the checkpoint's projections)
PACKED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class CheckpointTensor:
    """One tensor of a checkpoint, for dummy weights: shape, dtype and the range random
    values are drawn from (integer dtypes: integers in [low, high) when that holds one,
    else random bits over the whole type)."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None = None     # None: the model's dtype
    low: float = -1e-3
    high: float = 1e-3
    shared: bool = False                 # the same for every projection fused with this one (g_idx)


def make_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype, *,
               output_dim: int | None = None, input_dim: int | None = None, output_ratio: int = 1,
               input_ratio: int = 1, shard_indexed: bool = False, fill: float | None = None) -> nn.Parameter:
    """Register `name` on `layer` (empty, or filled with `fill`) with the layer's
    weight_loader and its sharding attributes (see the module docstring)."""
    data = torch.empty(shape, dtype=dtype) if fill is None else torch.full(shape, fill, dtype=dtype)
    param = nn.Parameter(data, requires_grad=False)
    param.output_dim, param.input_dim = output_dim, input_dim
    param.output_ratio, param.input_ratio = output_ratio, input_ratio
    param.shard_indexed = shard_indexed
    param.weight_loader = layer.weight_loader
    layer.register_parameter(name, param)
    return param


def replace_param(layer: nn.Module, name: str, data: torch.Tensor) -> None:
    """After loading: set (or swap) a parameter to a repacked tensor (a plain Parameter; no loader)."""
    if hasattr(layer, name):
        delattr(layer, name)
    layer.register_parameter(name, nn.Parameter(data, requires_grad=False))


def check_divisible(size: int, unit: int, what: str, layer: str) -> None:
    if size % unit:
        raise ValueError(f"{layer}: {what} ({size}) is not divisible by {unit}; this quantized checkpoint cannot "
                         "be split this way (tensor_parallel_size) or is malformed")


class LinearMethod:
    """How one linear layer stores and multiplies its weights."""

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype) -> None:
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def apply_silu_and_mul(self, layer: nn.Module, gate_up: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of gate_up = [gate | up] through this layer's matmul (no bias: the
        caller adds it) in one kernel; None where this method has no such kernel for these
        inputs (the caller runs the two)."""
        return None

    def apply_normed(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(this layer of norm(x + residual), x + residual) (no bias) in one kernel; None where
        this method has no such kernel for these inputs (the caller runs the norm first)."""
        return None

    def independent_rows(self, layer: nn.Module) -> int:
        """Up to how many rows x a product on this layer computes each row alike whatever the
        other rows (a request's values independent of its batch; 0: not at all). The LoRA deltas
        keep that up to the same count (layers/lora.py)."""
        return 0

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass

    def checkpoint_tensors(self, output_size: int, input_size: int, params_dtype: torch.dtype
                           ) -> dict[str, CheckpointTensor]:
        raise NotImplementedError


class QuantizationConfig:
    """A quantization scheme read from a checkpoint's quantization_config (or asked for
    online). Subclasses set `name` and implement from_config and get_linear_method."""

    name: str = ""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantizationConfig":
        return cls(config)

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        """The method for the linear layer named `prefix` (pagedserve's name: a fused
        qkv_proj / gate_up_proj stands for its checkpoint projections); None leaves it
        unquantized."""
        raise NotImplementedError

    def get_embedding_method(self, prefix: str) -> Any:
        """The method of the vocab embedding / LM head named `prefix` (it packs the rows and
        both looks them up and multiplies by them); None keeps them float (every format
        but GGUF)."""
        return None


def skipped(patterns: list[str], prefix: str) -> bool:
    """Whether a layer is in a format's list of modules left unquantized (substrings of the
    checkpoint names, as transformers matches modules_to_not_convert)."""
    return any(pattern in name for pattern in patterns for name in checkpoint_names(prefix))


def fused_name(name: str) -> str:
    """A checkpoint tensor's name with its projection replaced by the fused layer's
    (model.layers.0.self_attn.k_proj.g_idx -> model.layers.0.self_attn.qkv_proj.g_idx)."""
    for fused, members in PACKED_MODULES.items():
        for member in members:
            if f".{member}." in name:
                return name.replace(f".{member}.", f".{fused}.")
    return name


def checkpoint_names(prefix: str) -> list[str]:
    """pagedserve layer name -> the checkpoint projections it holds."""
    head, _, last = prefix.rpartition(".")
    if last in PACKED_MODULES:
        return [f"{head}.{name}" if head else name for name in PACKED_MODULES[last]]
    return [prefix]
