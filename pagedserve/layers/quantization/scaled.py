"""8-bit weights with scales: W8A8 int8 and FP8 (e4m3), as compressed-tensors, HF's `fp8`
format and online FP8 store them.

    weight        [N, K] int8 or float8_e4m3fn
    weight_scale  per tensor: one per logical shard (q, k, v: shard_indexed), expanded to a
                  per-channel vector after loading (exact; nothing is requantized);
                  per channel: [N, 1]; block: [N / bn, K / bk] (HF calls it weight_scale_inv)
    input_scale   static activations: one per logical shard (the largest is used)

Activations: "token" (dynamic per-token scales), "static" (the checkpoint's per-tensor
scale), "group" (dynamic per token and group of bk columns: FP8 block checkpoints) or None
(weight-only: the weight is dequantized for each matmul).

CUDA: int8 through torch._int_mm, FP8 through torch._scaled_mm with row-wise scales (Hopper
and Ada), both fed by the per-token Triton quantization. CPU: torch._int_mm for int8; FP8 and
block scales in fp32 (the 8-bit products are exact there), one layer at a time.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.layers.quantization.act_quant import (FP8, quantize_per_group_torch, quantize_per_token,
                                                      quantize_static)
from pagedserve.layers.quantization.base import (CheckpointTensor, LinearMethod, check_divisible, make_param,
                                                 replace_param)

logger = logging.getLogger(__name__)


def _scaled_mm_ok(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class ScaledLinearMethod(LinearMethod):
    def __init__(self, weight_dtype: torch.dtype, weight_strategy: str, activations: str | None,
                 block: tuple[int, int] | None = None, scale_name: str = "weight_scale") -> None:
        if weight_strategy not in ("tensor", "channel", "block"):
            raise ValueError(f"8-bit weights: strategy {weight_strategy!r} is not supported (tensor, channel, block)")
        if weight_strategy == "block" and (block is None or activations not in ("group", None)):
            raise ValueError("8-bit block weights need block sizes and per-group dynamic (or no) activation scales")
        self.weight_dtype, self.weight_strategy, self.activations = weight_dtype, weight_strategy, activations
        self.block, self.scale_name = block, scale_name

    # ---- parameters ----------------------------------------------------------------------
    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype):
        n, k = sum(output_partition_sizes), input_size_per_partition
        make_param(layer, "weight", (n, k), self.weight_dtype, output_dim=0, input_dim=1)
        if self.weight_strategy == "tensor":
            make_param(layer, self.scale_name, (len(output_partition_sizes),), torch.float32, shard_indexed=True,
                       fill=1.0)
        elif self.weight_strategy == "channel":
            make_param(layer, self.scale_name, (n, 1), torch.float32, output_dim=0)
        else:
            bn, bk = self.block
            for size in output_partition_sizes:
                check_divisible(size, bn, "output features per rank (block)", layer.prefix)
            check_divisible(k, bk, "input features per rank (block)", layer.prefix)
            make_param(layer, self.scale_name, (n // bn, k // bk), torch.float32, output_dim=0, output_ratio=bn,
                       input_dim=1, input_ratio=bk)
        if self.activations == "static":
            make_param(layer, "input_scale", (len(output_partition_sizes),), torch.float32, shard_indexed=True,
                       fill=1.0)

    def checkpoint_tensors(self, output_size, input_size, params_dtype):
        # dequantized dummy weights of about 1e-3, as float dummy weights
        qmax = 127.0 if self.weight_dtype == torch.int8 else 448.0
        low = 1e-3 / qmax
        out = {"weight": CheckpointTensor((output_size, input_size), self.weight_dtype, -qmax, qmax)}
        if self.weight_strategy == "tensor":
            out[self.scale_name] = CheckpointTensor((1,), torch.float32, low, low)
        elif self.weight_strategy == "channel":
            out[self.scale_name] = CheckpointTensor((output_size, 1), torch.float32, low / 2, low)
        else:
            bn, bk = self.block
            out[self.scale_name] = CheckpointTensor((-(-output_size // bn), -(-input_size // bk)), torch.float32,
                                                    low / 2, low)
        if self.activations == "static":
            out["input_scale"] = CheckpointTensor((1,), torch.float32, 0.05, 0.05)
        return out

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        scale = getattr(layer, self.scale_name).data
        if self.weight_strategy == "tensor":   # per shard -> per output channel: exact
            sizes = torch.tensor(layer.output_partition_sizes, device=scale.device)
            scale = scale.repeat_interleave(sizes)
        elif self.weight_strategy == "channel":
            scale = scale.reshape(-1)
        delattr(layer, self.scale_name)
        replace_param(layer, "weight_scale", scale.float().contiguous())
        if self.activations == "static":
            shard_scales = layer.input_scale.data
            if shard_scales.numel() > 1 and not torch.all(shard_scales == shard_scales[0]):
                logger.warning("%s: the fused projections have different static input scales %s; using the "
                               "largest", layer.prefix, shard_scales.tolist())
            replace_param(layer, "input_scale", shard_scales.max().reshape(1, 1).float())

    # ---- matmul --------------------------------------------------------------------------
    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """[N, K] fp32."""
        weight, scale = layer.weight.float(), layer.weight_scale
        if self.weight_strategy == "block":
            bn, bk = self.block
            scale = scale.repeat_interleave(bn, 0)[:weight.shape[0]].repeat_interleave(bk, 1)[:, :weight.shape[1]]
            return weight * scale
        return weight * scale[:, None]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.activations is None:
            out = F.linear(x, self.dequantized_weight(layer).to(x.dtype))
        elif self.activations == "group":
            xq, xs = quantize_per_group_torch(x, FP8, self.block[1])
            x_deq = (xq.float().view(x.shape[0], -1, self.block[1]) * xs[..., None]).view(x.shape[0], -1)
            out = F.linear(x_deq, self.dequantized_weight(layer)).to(x.dtype)
        else:
            if self.activations == "static":
                xs = layer.input_scale
                xq = quantize_static(x, xs, self.weight_dtype)
                xs = xs.expand(x.shape[0], 1)
            else:
                xq, xs = quantize_per_token(x, self.weight_dtype)
            out = self._matmul(xq, xs, layer.weight, layer.weight_scale, x.dtype)
        return out if bias is None else out + bias

    def _matmul(self, xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        """(xq [M, K] * xs [M, 1]) @ (weight [N, K] * weight_scale [N]).T -> [M, N] in `dtype`."""
        if self.weight_dtype == torch.int8:
            return int8_matmul(xq, xs, weight, weight_scale, dtype)
        if _scaled_mm_ok(xq.device):
            out = torch._scaled_mm(xq, weight.t(), scale_a=xs.float().contiguous(),
                                   scale_b=weight_scale.view(1, -1), out_dtype=torch.bfloat16)
            return out.to(dtype)
        return ((xq.float() @ weight.float().t()) * xs * weight_scale[None, :]).to(dtype)


def int8_matmul(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """(xq [M, K] int8 * xs [M, 1]) @ (weight [N, K] int8 * weight_scale [N]).T through
    torch._int_mm (int32 accumulation: exact), scaled in fp32, returned in `dtype`."""
    m = xq.shape[0]
    if xq.is_cuda and m <= 16:   # cuBLASLt's int8 matmul wants more than 16 rows
        padded = torch.zeros((17, xq.shape[1]), dtype=xq.dtype, device=xq.device)
        padded[:m] = xq
        acc = torch._int_mm(padded, weight.t())[:m]
    else:
        acc = torch._int_mm(xq, weight.t())
    return (acc.float() * xs * weight_scale[None, :]).to(dtype)


class OnlineFp8Method(ScaledLinearMethod):
    """quantization="fp8" on a float checkpoint: the layer loads float weights as usual and
    quantizes them once after loading (per tensor: one scale per logical shard, or per
    channel); activations are quantized per token at run time."""

    def __init__(self, weight_strategy: str) -> None:
        super().__init__(FP8, weight_strategy, "token")

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype):
        make_param(layer, "weight", (sum(output_partition_sizes), input_size_per_partition), params_dtype,
                   output_dim=0, input_dim=1)

    def checkpoint_tensors(self, output_size, input_size, params_dtype):
        return {"weight": CheckpointTensor((output_size, input_size))}

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight, scale = quantize_weight(layer.weight.data, FP8, self.weight_strategy, layer.output_partition_sizes)
        replace_param(layer, "weight", weight)
        replace_param(layer, "weight_scale", scale)


def quantize_weight(weight: torch.Tensor, dtype: torch.dtype, strategy: str,
                    shard_sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] -> (8-bit weight, per-channel fp32 scale [N]); "tensor" uses one
    scale per logical shard (absmax / qmax), "channel" one per row."""
    from pagedserve.layers.quantization.act_quant import cast_quantized, qmax
    weight = weight.float()
    if strategy == "channel":
        scale = weight.abs().amax(dim=1)
    else:
        scale = torch.cat([part.abs().amax().expand(part.shape[0]) for part in weight.split(shard_sizes)])
    scale = (scale / qmax(dtype)).clamp(min=1e-12)
    return cast_quantized(weight / scale[:, None], dtype), scale.contiguous()
