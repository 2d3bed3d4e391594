"""The 4-bit weight-only checkpoint layouts, each loaded as written and repacked by
Int4LinearMethod into the kernels' layout (int4.py).

    compressed-tensors pack-quantized   weight_packed int32 [N, K/8] (packed along K, values
                                        stored + 8), weight_scale [N, G], weight_zero_point
                                        int32 [N/8, G] (asymmetric; packed along N),
                                        weight_g_idx [K] (actorder "group"); w = (q - zp) * s
    GPTQ ("v1" gptq format)             qweight int32 [K/8, N], qzeros int32 [G, N/8] holding
                                        zero - 1, scales [G, N], g_idx [K] (desc_act)
    AWQ (GEMM)                          qweight int32 [K, N/8] and qzeros int32 [G, N/8], both
                                        packed along N in the order 0 2 4 6 1 3 5 7; scales [G, N]
"""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.layers.quantization.base import CheckpointTensor, make_param
from pagedserve.layers.quantization.int4 import PACK, Int4LinearMethod, pack_int32, unpack_int32

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]   # nibble i holds column AWQ_ORDER[i] of its 8
_SCALE_RANGE = (1e-4, 2e-4)            # dummy scales: int4 weights of about 1e-3


def _groups(size: int, group_size: int) -> int:
    return 1 if group_size == -1 else size // group_size


class CompressedTensorsW4A16(Int4LinearMethod):
    def __init__(self, group_size: int, symmetric: bool, has_g_idx: bool) -> None:
        super().__init__(group_size, has_g_idx)
        self.symmetric = symmetric

    def checkpoint_names(self):
        return ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx")

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype):
        n, k = sum(output_partition_sizes), input_size_per_partition
        group, sharded, groups = self.grouping(layer, input_size, k, output_partition_sizes if not self.symmetric
                                               else None)
        make_param(layer, "weight_packed", (n, k // PACK), torch.int32, output_dim=0, input_dim=1, input_ratio=PACK)
        scale_dims = dict(output_dim=0, input_dim=1 if sharded else None, input_ratio=group)
        make_param(layer, "weight_scale", (n, groups), params_dtype, **scale_dims)
        if not self.symmetric:
            make_param(layer, "weight_zero_point", (n // PACK, groups), torch.int32, output_ratio=PACK, **scale_dims)
        if self.has_g_idx:
            make_param(layer, "weight_g_idx", (k,), torch.int32, input_dim=0)

    def checkpoint_tensors(self, output_size, input_size, params_dtype):
        groups = _groups(input_size, self.group_size)
        out = {"weight_packed": CheckpointTensor((output_size, input_size // PACK), torch.int32),
               "weight_scale": CheckpointTensor((output_size, groups), None, *_SCALE_RANGE)}
        if not self.symmetric:
            out["weight_zero_point"] = CheckpointTensor((output_size // PACK, groups), torch.int32)
        if self.has_g_idx:
            out["weight_g_idx"] = CheckpointTensor((input_size,), torch.int32, 0, groups, shared=True)
        return out

    def to_kernel_layout(self, layer: nn.Module):
        q = unpack_int32(layer.weight_packed.data, 1)                    # [N, K], stored + 8
        qweight = pack_int32(q.t(), 0)
        scales = layer.weight_scale.data.t()
        if self.symmetric:
            zeros = torch.full_like(scales, 8.0)
        else:
            zeros = unpack_int32(layer.weight_zero_point.data, 0).t()      # [G, N], stored + 8
        g_idx = layer.weight_g_idx.data if self.has_g_idx else None
        return qweight, scales, zeros, _valid_g_idx(g_idx, scales.shape[0])


class GPTQMethod(Int4LinearMethod):
    def __init__(self, group_size: int, desc_act: bool, zero_offset: int) -> None:
        super().__init__(group_size, desc_act)
        self.zero_offset = zero_offset   # 1 for the v1 "gptq" format, 0 for gptq_v2

    def checkpoint_names(self):
        return ("qweight", "qzeros", "scales", "g_idx")

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype):
        n, k = sum(output_partition_sizes), input_size_per_partition
        group, sharded, groups = self.grouping(layer, input_size, k, output_partition_sizes)
        make_param(layer, "qweight", (k // PACK, n), torch.int32, input_dim=0, input_ratio=PACK, output_dim=1)
        dims = dict(input_dim=0 if sharded else None, input_ratio=group, output_dim=1)
        make_param(layer, "qzeros", (groups, n // PACK), torch.int32, output_ratio=PACK, **dims)
        make_param(layer, "scales", (groups, n), params_dtype, **dims)
        if self.has_g_idx:
            make_param(layer, "g_idx", (k,), torch.int32, input_dim=0)

    def checkpoint_tensors(self, output_size, input_size, params_dtype):
        groups = _groups(input_size, self.group_size)
        out = {"qweight": CheckpointTensor((input_size // PACK, output_size), torch.int32),
               "qzeros": CheckpointTensor((groups, output_size // PACK), torch.int32),
               "scales": CheckpointTensor((groups, output_size), None, *_SCALE_RANGE)}
        if self.has_g_idx:
            out["g_idx"] = CheckpointTensor((input_size,), torch.int32, 0, groups, shared=True)
        return out

    def to_kernel_layout(self, layer: nn.Module):
        zeros = unpack_int32(layer.qzeros.data, 1) + self.zero_offset
        g_idx = layer.g_idx.data if self.has_g_idx else None
        return layer.qweight.data, layer.scales.data, zeros, _valid_g_idx(g_idx, zeros.shape[0])


class AWQMethod(Int4LinearMethod):
    def __init__(self, group_size: int) -> None:
        super().__init__(group_size, False)

    def checkpoint_names(self):
        return ("qweight", "qzeros", "scales")

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype):
        n, k = sum(output_partition_sizes), input_size_per_partition
        group, _, groups = self.grouping(layer, input_size, k, output_partition_sizes)
        make_param(layer, "qweight", (k, n // PACK), torch.int32, input_dim=0, output_dim=1, output_ratio=PACK)
        make_param(layer, "qzeros", (groups, n // PACK), torch.int32, input_dim=0, input_ratio=group, output_dim=1,
                   output_ratio=PACK)
        make_param(layer, "scales", (groups, n), params_dtype, input_dim=0, input_ratio=group, output_dim=1)

    def checkpoint_tensors(self, output_size, input_size, params_dtype):
        groups = _groups(input_size, self.group_size)
        return {"qweight": CheckpointTensor((input_size, output_size // PACK), torch.int32),
                "qzeros": CheckpointTensor((groups, output_size // PACK), torch.int32),
                "scales": CheckpointTensor((groups, output_size), None, *_SCALE_RANGE)}

    def to_kernel_layout(self, layer: nn.Module):
        q = unpack_int32(layer.qweight.data, 1, AWQ_ORDER)
        return pack_int32(q, 0), layer.scales.data, unpack_int32(layer.qzeros.data, 1, AWQ_ORDER), None


def _valid_g_idx(g_idx: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """A g_idx pointing outside the scales would read out of bounds: refuse it."""
    if g_idx is None:
        return None
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"g_idx holds groups outside 0..{groups - 1} (min {int(g_idx.min())}, "
                         f"max {int(g_idx.max())}): corrupt act-order checkpoint")
    return g_idx
