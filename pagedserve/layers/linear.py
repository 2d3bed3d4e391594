"""Megatron-style linear layers. Each parameter owns a `weight_loader(param, loaded, shard_id)`
that copies only this rank's shard; `loaded` may be a tensor or a lazy safetensors slice
(only the slice is read from disk). A layer's parameters and matmul belong to its
LinearMethod (layers/quantization: float weights, or a quantized format); the parameters
say which dims run over output / input features, and the layer's one weight_loader shards
them by those attributes.

    ColumnParallelLinear   weight [out / tp, in]     output stays sharded
    MergedColumnParallel   [gate; up] stacked on dim 0, each sharded
    QKVParallelLinear      [q; k; v]; KV heads replicated when num_kv_heads < tp
    RowParallelLinear      weight [out, in / tp]     all-reduce of the partial sums
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedserve.layers.activation import silu_and_mul
from pagedserve.layers.lora import LoraStep, LoraWeights
from pagedserve.layers.linear_ops import (_copy, as_tensor, default_weight_loader, fuses, linear,  # noqa: F401
                                          narrow, set_gemv_max_rows)
from pagedserve.layers.norm import RMSNorm
from pagedserve.layers.parallel import all_reduce, divide, tp_rank, tp_world_size
from pagedserve.layers.quantization import LinearMethod, QuantizationConfig, UnquantizedLinearMethod


class LinearBase(nn.Module):
    """Sizes per partition; `quant_config` picks the LinearMethod (None: float weights) and
    `prefix` is the layer's name in the model (quantization schemes and ignore lists use it)."""

    splits_output = False   # column-parallel: output features are sharded
    splits_input = False    # row-parallel: input features are sharded

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 output_partition_sizes: list[int] | None = None, input_size: int | None = None,
                 output_size: int | None = None) -> None:
        super().__init__()
        self.prefix = prefix
        self.input_size_per_partition, self.output_size_per_partition = in_features, out_features
        self.output_partition_sizes = output_partition_sizes or [out_features]
        self.params_dtype = dtype
        method: LinearMethod | None = quant_config.get_linear_method(self, prefix) if quant_config else None
        self.quant_method = method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, in_features, self.output_partition_sizes, input_size or in_features,
                                         output_size or out_features, dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.output_dim, self.bias.input_dim = 0, None
            self.bias.output_ratio = self.bias.input_ratio = 1
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.lora: LoraWeights | None = None   # enable_lora (LoRA adapters: layers/lora.py)

    # The shard of this rank, in features: (offset in the parameter, size, start in the checkpoint).
    def output_shard(self, shard_id: Any) -> tuple[int, int, int]:
        raise NotImplementedError

    def shard_index(self, shard_id: Any) -> int:
        """Index of a logical shard (q, k, v / gate, up) in the parameters that hold one value each."""
        return 0

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if getattr(param, "shard_indexed", False):
            _copy(param.data[self.shard_index(shard_id)], as_tensor(loaded).reshape(()))
            return
        dest = param.data
        out_dim = getattr(param, "output_dim", None)
        if self.splits_output and out_dim is not None:
            offset, size, start = self.output_shard(shard_id)
            ratio = param.output_ratio
            for value in (offset, size, start):
                if value % ratio:
                    raise ValueError(f"{self.prefix}: output shard ({offset}, {size}, {start}) does not fall on "
                                     f"whole packs of {ratio}: this checkpoint cannot be split this way")
            dest = dest.narrow(out_dim, offset // ratio, size // ratio)
            loaded = narrow(loaded, out_dim, start // ratio, size // ratio)
        in_dim = getattr(param, "input_dim", None)
        if self.splits_input and in_dim is not None:
            size, ratio = self.input_size_per_partition, param.input_ratio
            if size % ratio:
                raise ValueError(f"{self.prefix}: input shard of {size} features is not a whole number of "
                                 f"groups or packs of {ratio}: this checkpoint cannot be split this way")
            loaded = narrow(loaded, in_dim, self.tp_rank * size // ratio, size // ratio)
        if self.splits_output and out_dim is None and shard_id is not None:
            # one tensor for all fused projections (act-order g_idx): they must agree
            data = as_tensor(loaded)
            if getattr(param, "shared_loaded", False) and not torch.equal(dest, data.to(dest.device, dest.dtype)):
                raise ValueError(f"{self.prefix}: the projections fused here have different {tuple(dest.shape)} "
                                 f"tensors where one is shared (act-order g_idx); cannot fuse them")
            param.shared_loaded = True
            loaded = data
        _copy(dest, as_tensor(loaded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x, self.bias)
        return out if self.lora is None else self._add_lora(x, out)

    def _add_lora(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.lora.add_to(x, out)

    # LoRA: the logical output slices an adapter targets (shard ids), and the factors' sharding
    lora_slices: tuple = (None,)

    def enable_lora(self, step: LoraStep, device: torch.device) -> None:
        """Room for the step's slots of adapters on this layer (zeros: no effect); the fused
        norm / activation launches are skipped from now on (they never see x)."""
        self.lora = LoraWeights(step, len(self.lora_slices), self.input_size_per_partition,
                                self.output_size_per_partition, self.params_dtype, device,
                                self.quant_method.independent_rows(self) if device.type == "cpu" else 0)

    def set_lora(self, slot: int, factors: dict, scaling: float) -> None:
        """Adapter factors {shard id: (A [r, in], B [out, r])} as the checkpoint holds them
        (whole, unsharded) into `slot`, this rank's part; slices missing stay zero."""
        lora = self.lora
        lora.clear(slot)
        for index, shard_id in enumerate(self.lora_slices):
            if shard_id not in factors:
                continue
            a, b = factors[shard_id]
            if self.splits_input:
                size = self.input_size_per_partition
                a = a[:, self.tp_rank * size:(self.tp_rank + 1) * size]
            offset = 0
            if self.splits_output:
                offset, size, start = self.output_shard(shard_id)
                b = b[start:start + size]
            lora.set_slice(slot, index, a, b * scaling, offset)

    def _fuses(self, x: torch.Tensor) -> bool:
        """Decode-sized x on CUDA into float weights without a bias: the gemv with a prologue."""
        return self.bias is None and type(self.quant_method) is UnquantizedLinearMethod and fuses(x, self.weight)

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer of norm(x + residual) (of norm(x) without one) -> (output, x + residual
        or x): a quantized layer's one launch where its LinearMethod has one, else the norm
        (updating residual in place) and the matmul. (A one-row forward of float
        layers skips this: LlamaModel's norm chain takes the norm into the gemvs around it.)"""
        fused = self.quant_method.apply_normed(self, x, residual, norm) \
            if self.bias is None and self.lora is None else None
        if fused is not None:
            return fused
        if residual is None:
            return self(norm(x)), x
        if x.dtype != residual.dtype:   # an fp32 W4A16 hand-off (w4a16_handoff.py) this layer's launch did not take
            x = x.to(residual.dtype)
        normed, residual = norm(x, residual)
        return self(normed), residual


class ColumnParallelLinear(LinearBase):
    splits_output = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, quant_config: QuantizationConfig | None = None,
                 prefix: str = "", output_sizes: list[int] | None = None) -> None:
        self.tp_size, self.tp_rank = tp_world_size(), tp_rank()
        sizes = [divide(size, self.tp_size, "output features") for size in (output_sizes or [out_features])]
        super().__init__(in_features, sum(sizes), bias, dtype, quant_config, prefix, sizes, in_features, out_features)

    def output_shard(self, shard_id: Any) -> tuple[int, int, int]:
        size = self.output_size_per_partition
        return 0, size, self.tp_rank * size


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stacked (gate and up); shard_id indexes `output_sizes`."""

    lora_slices = (0, 1)

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, dtype, quant_config, prefix, output_sizes)

    def output_shard(self, shard_id: Any) -> tuple[int, int, int]:
        shard_size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        return offset, shard_size, self.tp_rank * shard_size

    def shard_index(self, shard_id: Any) -> int:
        return shard_id


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matmul. Query heads are split across ranks; KV heads
    too when there are at least tp of them, otherwise each rank holds a replica of the KV
    head its query heads use."""

    lora_slices = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        tp = tp_world_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp, "num_attention_heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = divide(num_kv_heads, tp, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = divide(tp, num_kv_heads, "tensor_parallel_size over num_key_value_heads")
        q, kv = self.num_heads * head_dim * tp, self.num_kv_heads * head_dim * tp
        super().__init__(hidden_size, q + 2 * kv, bias, dtype, quant_config, prefix, [q, kv, kv])

    def output_shard(self, shard_id: Any) -> tuple[int, int, int]:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            return 0, q_size, self.tp_rank * q_size
        offset = q_size if shard_id == "k" else q_size + kv_size
        return offset, kv_size, (self.tp_rank // self.kv_replicas) * kv_size

    def shard_index(self, shard_id: Any) -> int:
        return "qkv".index(shard_id)


class RowParallelLinear(LinearBase):
    splits_input = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, reduce_results: bool = True,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        self.tp_size, self.tp_rank = tp_world_size(), tp_rank()
        self.reduce_results = reduce_results
        super().__init__(divide(in_features, self.tp_size, "input features"), out_features, bias, dtype,
                         quant_config, prefix, None, in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x)
        # LoRA: this rank's partial delta joins the partial sums before their all-reduce
        return self._reduce(out if self.lora is None else self._add_lora(x, out))

    def forward_silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """This layer of silu(gate) * up for gate_up = [gate | up]: one gemv launch for one row
        (the activation in its prologue; a quantized layer's where its LinearMethod has one),
        else the activation and the matmul."""
        if self.lora is not None:
            return self(silu_and_mul(gate_up))
        if gate_up.shape[0] == 1 and self._fuses(gate_up):
            from pagedserve.layers.triton_gemv import silu_and_mul_gemv
            return self._reduce(silu_and_mul_gemv(gate_up, self.weight))
        fused = self.quant_method.apply_silu_and_mul(self, gate_up)
        return self(silu_and_mul(gate_up)) if fused is None else self._reduce(fused)

    def _reduce(self, out: torch.Tensor) -> torch.Tensor:
        # the bias is not sharded; added once, after the reduction
        if self.reduce_results and self.tp_size > 1:
            out = all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out
