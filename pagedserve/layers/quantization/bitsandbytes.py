"""bitsandbytes 8-bit (LLM.int8): pre-quantized load_in_8bit checkpoints (`weight` int8
[N, K] and `SCB` [N], the row absmax: w = weight * SCB / 127) and TGI's QUANTIZE=bitsandbytes
(vLLM's quantization="bitsandbytes" on a float checkpoint: rows quantized at load).

The forward is LLM.int8's, not a weight-only approximation: input values with |x| >=
threshold (6.0 by default) are outliers and run in floating point against the dequantized
weight; the rest of each row is quantized per token (absmax / 127) and multiplied int8 x
int8 (torch._int_mm) with int32 accumulation. The outlier decomposition is per token (a
row's outlier columns are its own), which is bitsandbytes' for a batch of one row; for larger
batches bitsandbytes moves a column to fp16 for every row if any row has an outlier there,
which makes a sequence's output depend on what it is batched with (chunked prefill,
continuous batching) - not acceptable in a server. Outliers are masked, not gathered, so
shapes stay static (CUDA graphs) at the price of a dense float matmul per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.layers.quantization.act_quant import quantize_per_token
from pagedserve.layers.quantization.base import CheckpointTensor, LinearMethod, make_param, replace_param


class BitsAndBytesInt8Method(LinearMethod):
    def __init__(self, threshold: float, online: bool) -> None:
        self.threshold, self.online = threshold, online

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype):
        n, k = sum(output_partition_sizes), input_size_per_partition
        if self.online:
            make_param(layer, "weight", (n, k), params_dtype, output_dim=0, input_dim=1)
            return
        make_param(layer, "weight", (n, k), torch.int8, output_dim=0, input_dim=1)
        make_param(layer, "SCB", (n,), torch.float32, output_dim=0)

    def checkpoint_tensors(self, output_size, input_size, params_dtype):
        if self.online:
            return {"weight": CheckpointTensor((output_size, input_size))}
        return {"weight": CheckpointTensor((output_size, input_size), torch.int8),
                "SCB": CheckpointTensor((output_size,), torch.float32, 5e-4, 1e-3)}

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.online:
            weight = layer.weight.data.float()
            scb = weight.abs().amax(dim=1).clamp(min=1e-12)
            replace_param(layer, "weight", (weight * 127 / scb[:, None]).round().clamp(-127, 127).to(torch.int8))
            replace_param(layer, "SCB", scb)
        replace_param(layer, "row_scale", (layer.SCB.data.float() / 127).contiguous())

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        from pagedserve.layers.quantization.scaled import int8_matmul
        outliers = x.abs() >= self.threshold if self.threshold > 0 else torch.zeros_like(x, dtype=torch.bool)
        xq, xs = quantize_per_token(x.masked_fill(outliers, 0), torch.int8)
        out = int8_matmul(xq, xs, layer.weight, layer.row_scale, torch.float32)
        dense = layer.weight.float() * layer.row_scale[:, None]
        out = out + F.linear(x.masked_fill(~outliers, 0).float(), dense)
        out = out.to(x.dtype)
        return out if bias is None else out + bias
