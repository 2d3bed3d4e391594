"""Plain float weights: today's layer, one [out/tp, in/tp] `weight` (sharded along output
features by column-parallel layers, input features by row-parallel ones)."""
from __future__ import annotations

import torch

from pagedserve.layers.quantization.base import CheckpointTensor, LinearMethod, make_param


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype):
        make_param(layer, "weight", (sum(output_partition_sizes), input_size_per_partition), params_dtype,
                   output_dim=0, input_dim=1)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        from pagedserve.layers.linear_ops import linear
        return linear(x, layer.weight, bias)

    def checkpoint_tensors(self, output_size, input_size, params_dtype):
        return {"weight": CheckpointTensor((output_size, input_size))}
