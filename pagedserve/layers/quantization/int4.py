"""4-bit weight-only linear layers (W4A16): compressed-tensors pack-quantized, GPTQ and AWQ
load their own checkpoint layouts (subclasses) and repack once after loading into one
layout the kernels read:

    qweight  int32 [K/8, N]   8 consecutive input rows per int32 (row 8j+i in bits 4i..4i+3),
                              unsigned 4-bit values q in 0..15
    scales   [G, N]           the model dtype
    zeros    [G, N]           the model dtype, in q's unsigned domain: w = (q - zeros) * scales
    g_idx    int32 [K]        group of each input row (act-order); absent: row k is in group k // group_size
    act_order_perm int64 [K]  where act-order groups are whole: the rows sorted by group at load
                              (g_idx then absent) and x's columns gathered in that order per matmul

CUDA: the Triton kernels of triton_w4a16_gemv.py (the GEMVs of decode-sized batches) and
triton_w4a16.py (a GEMM with fused dequantization, and dequantize + cuBLAS for large
batches). CPU: the layer's weight is dequantized on the fly for each matmul (one layer at a
time, never the model).
"""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.layers.quantization.base import LinearMethod, check_divisible, replace_param

PACK = 8   # 4-bit values per int32


def unpack_int32(packed: torch.Tensor, dim: int, order: list[int] | None = None) -> torch.Tensor:
    """int32 words holding 8 unsigned 4-bit values along `dim` -> int32 values 0..15, `dim`
    8 times longer. `order[i]` is the position of nibble i within its 8 (AWQ interleaves)."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF             # [..., 8] in nibble order
    if order is not None:
        nibbles = nibbles[..., torch.tensor(order).argsort().to(packed.device)]
    nibbles = nibbles.movedim(-1, dim + 1) if dim != packed.dim() - 1 else nibbles
    shape = list(packed.shape)
    shape[dim] *= PACK
    return nibbles.reshape(shape)


def pack_int32(values: torch.Tensor, dim: int, order: list[int] | None = None) -> torch.Tensor:
    """The inverse of unpack_int32: values 0..15 -> int32 words along `dim`."""
    values = values.to(torch.int32).movedim(dim, -1)
    values = values.reshape(*values.shape[:-1], -1, PACK)
    if order is not None:
        values = values[..., torch.tensor(order).to(values.device)]
    shifts = torch.arange(0, 32, 4, device=values.device, dtype=torch.int32)
    packed = (values << shifts).sum(-1, dtype=torch.int64)   # disjoint bits: sum == or
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.movedim(-1, dim).contiguous()


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    g_idx: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The kernels' layout -> the float weight [K, N] (in `dtype`)."""
    q = unpack_int32(qweight, 0)
    groups = g_idx.long() if g_idx is not None else torch.arange(q.shape[0], device=q.device) // group_size
    return ((q.to(dtype) - zeros.to(dtype)[groups]) * scales.to(dtype)[groups])


def act_order_permutation(g_idx: torch.Tensor, group_size: int, groups: int) -> torch.Tensor | None:
    """The input-row order that makes act-order groups contiguous (sorted row r in group
    r // group_size), or None where the groups are not whole runs of group_size rows (a
    row-parallel shard of an act-order layer keeps its g_idx)."""
    k = g_idx.numel()
    if group_size <= 0 or k != groups * group_size:
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm].long(), torch.arange(k, device=g_idx.device) // group_size):
        return None
    return perm


# tests: the one-row FMA GEMV's paths (prologues, w4a16_handoff.py) on CPU tensors too, through
# Triton's interpreter; on CPU a layer otherwise dequantizes
ONE_ROW_GEMV_ON_CPU = False


def _one_row_gemv(x: torch.Tensor) -> bool:
    """One row on CUDA (or on CPU under ONE_ROW_GEMV_ON_CPU): the FMA GEMV's prologues."""
    return x.shape[0] == 1 and (x.is_cuda or ONE_ROW_GEMV_ON_CPU)


class Int4LinearMethod(LinearMethod):
    """The shared matmul; subclasses register their checkpoint's tensors and convert them in
    `to_kernel_layout(layer) -> (qweight, scales, zeros, g_idx)`."""

    def __init__(self, group_size: int, has_g_idx: bool = False) -> None:
        self.group_size = group_size    # -1: one group over all of K (per channel)
        self.has_g_idx = has_g_idx

    def group_for(self, layer: nn.Module, input_size: int, input_size_per_partition: int) -> int:
        """The group size over this rank's K (per channel: the whole of it), checked."""
        if self.group_size == -1:
            return input_size_per_partition
        check_divisible(input_size, self.group_size, "input features", layer.prefix)
        if not self.has_g_idx:
            check_divisible(input_size_per_partition, self.group_size, "input features per rank", layer.prefix)
        return self.group_size

    def grouping(self, layer: nn.Module, input_size: int, input_size_per_partition: int,
                 packed_outputs: list[int] | None = None) -> tuple[int, bool, int]:
        """(group size on this rank, whether scales are sharded along K, groups held) for a
        layer; `packed_outputs`: the output shards, checked to hold whole packs of 8."""
        group = self.group_for(layer, input_size, input_size_per_partition)
        sharded = self.scales_sharded_on_input(layer, input_size, input_size_per_partition)
        size = input_size_per_partition if sharded else input_size
        for part in packed_outputs or []:
            check_divisible(part, PACK, "output features per rank (packed along N)", layer.prefix)
        return group, sharded, 1 if self.group_size == -1 else size // self.group_size

    def scales_sharded_on_input(self, layer: nn.Module, input_size: int, input_size_per_partition: int) -> bool:
        """Act-order groups of a row-parallel split are scattered over K: each rank keeps all
        of them (g_idx says which it uses); a per-channel scale is one group on every rank."""
        return self.group_size != -1 and not (self.has_g_idx and input_size != input_size_per_partition)

    def to_kernel_layout(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor | None]:
        raise NotImplementedError

    def checkpoint_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        dtype = layer.params_dtype
        qweight, scales, zeros, g_idx = self.to_kernel_layout(layer)
        for name in self.checkpoint_names():
            if hasattr(layer, name):
                delattr(layer, name)
        perm = None if g_idx is None else act_order_permutation(g_idx, self.group_size, scales.shape[0])
        if perm is not None:   # rows sorted by group: the kernels see plain groups, x is permuted once
            qweight, g_idx = pack_int32(unpack_int32(qweight, 0)[perm], 0), None
            replace_param(layer, "act_order_perm", perm)
        else:
            layer.act_order_perm = None
        replace_param(layer, "qweight", qweight.contiguous())
        replace_param(layer, "scales", scales.to(dtype).contiguous())
        replace_param(layer, "zeros", zeros.to(dtype).contiguous())
        if g_idx is not None:
            replace_param(layer, "g_idx", g_idx.to(torch.int32).contiguous())
        else:
            layer.g_idx = None
        k = qweight.shape[0] * PACK
        layer.kernel_group_size = self.group_size if self.group_size != -1 else k

    def apply_silu_and_mul(self, layer: nn.Module, gate_up: torch.Tensor) -> torch.Tensor | None:
        """One row on CUDA without act-order gathering: the FMA GEMV's SiLU-and-mul prologue."""
        if not _one_row_gemv(gate_up) or layer.act_order_perm is not None:
            return None
        from pagedserve.layers.quantization.triton_w4a16_gemv import w4a16_silu_and_mul_gemv
        return w4a16_silu_and_mul_gemv(gate_up, layer.qweight, layer.scales, layer.zeros, layer.kernel_group_size,
                                       layer.g_idx, getattr(layer, "w4a16_handoff", None))

    def apply_normed(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One row on CUDA without act-order gathering: the FMA GEMV's RMSNorm prologue."""
        if not _one_row_gemv(x) or x.dim() != 2 or layer.act_order_perm is not None:
            return None
        from pagedserve.layers.quantization.triton_w4a16_gemv import w4a16_rms_norm_gemv
        return w4a16_rms_norm_gemv(x, residual, norm.weight, norm.eps, layer.qweight, layer.scales, layer.zeros,
                                   layer.kernel_group_size, layer.g_idx, getattr(layer, "w4a16_handoff", None))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        handoff = getattr(layer, "w4a16_handoff", None)
        # w4a16_handoff.py: one row, fp32 out (not gate_up's [1, N + 1], whose prologue declined)
        if handoff is not None and x.shape[0] == 1 and bias is None and handoff.shape[1] == layer.qweight.shape[1]:
            from pagedserve.layers.quantization.triton_w4a16_gemv import w4a16_gemv
            return w4a16_gemv(x, layer.qweight, layer.scales, layer.zeros, layer.kernel_group_size, handoff=handoff)
        if layer.act_order_perm is not None:
            x = x.index_select(1, layer.act_order_perm)
        if x.is_cuda:
            from pagedserve.layers.quantization.triton_w4a16 import w4a16_matmul
            out = w4a16_matmul(x, layer.qweight, layer.scales, layer.zeros, layer.kernel_group_size, layer.g_idx)
        else:
            weight = dequantize_int4(layer.qweight, layer.scales, layer.zeros, layer.kernel_group_size,
                                     layer.g_idx, x.dtype)
            out = x @ weight
        return out if bias is None else out + bias
