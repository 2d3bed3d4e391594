"""The per-layer quantization hook (layers/quantization/base.py): a method's parameters are
sharded by their attributes (packed and grouped dims included) under tensor parallelism,
and a split that cuts a group is a clear error."""
from __future__ import annotations

import pytest
import torch

import pagedserve.layers.linear as linear_mod
from pagedserve.layers.quantization import LinearMethod, QuantizationConfig, make_param


class PackedMethod(LinearMethod):
    """GPTQ-like: qweight [K/8, N] packed along input, scales [K/g, N], one per-tensor scale per shard."""

    group = 4

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype):
        n, k = sum(output_partition_sizes), input_size_per_partition
        make_param(layer, "qweight", (k // 8, n), torch.int32, input_dim=0, input_ratio=8, output_dim=1)
        make_param(layer, "scales", (k // self.group, n), params_dtype, input_dim=0, input_ratio=self.group,
                   output_dim=1)
        make_param(layer, "tensor_scale", (len(output_partition_sizes),), params_dtype, shard_indexed=True)
        make_param(layer, "g_idx", (k,), torch.int32, input_dim=0)


class PackedConfig(QuantizationConfig):
    name = "packed-test"

    def get_linear_method(self, layer, prefix):
        return PackedMethod()


def _as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(linear_mod, "tp_world_size", lambda: world)
    monkeypatch.setattr(linear_mod, "tp_rank", lambda: rank)


@pytest.mark.parametrize("rank", [0, 1])
def test_row_and_merged_column_shards(monkeypatch, rank):
    _as_rank(monkeypatch, rank, 2)
    k, n = 32, 6
    qweight = torch.arange(k // 8 * n, dtype=torch.int32).reshape(k // 8, n)
    scales = torch.arange(k // 4 * n, dtype=torch.float32).reshape(k // 4, n)
    row = linear_mod.RowParallelLinear(k, n, quant_config=PackedConfig(), prefix="down_proj")
    row.qweight.weight_loader(row.qweight, qweight)
    row.scales.weight_loader(row.scales, scales)
    assert torch.equal(row.qweight, qweight[rank * 2:(rank + 1) * 2])
    assert torch.equal(row.scales, scales[rank * 4:(rank + 1) * 4])

    merged = linear_mod.MergedColumnParallelLinear(k, [4, 8], quant_config=PackedConfig(), prefix="gate_up_proj")
    gate = torch.arange(k // 8 * 4, dtype=torch.int32).reshape(k // 8, 4)
    up = -torch.arange(k // 8 * 8, dtype=torch.int32).reshape(k // 8, 8)
    merged.qweight.weight_loader(merged.qweight, gate, 0)
    merged.qweight.weight_loader(merged.qweight, up, 1)
    merged.tensor_scale.weight_loader(merged.tensor_scale, torch.tensor([3.0]), 1)
    assert torch.equal(merged.qweight[:, :2], gate[:, rank * 2:(rank + 1) * 2])
    assert torch.equal(merged.qweight[:, 2:], up[:, rank * 4:(rank + 1) * 4])
    assert merged.tensor_scale[1].item() == 3.0


def test_fused_projections_must_share_their_g_idx():
    merged = linear_mod.MergedColumnParallelLinear(16, [8, 8], quant_config=PackedConfig(), prefix="mlp.gate_up_proj")
    g_idx = torch.arange(16, dtype=torch.int32) // 4
    merged.g_idx.weight_loader(merged.g_idx, g_idx, 0)
    merged.g_idx.weight_loader(merged.g_idx, g_idx.clone(), 1)
    with pytest.raises(ValueError, match="mlp.gate_up_proj: the projections fused here have different"):
        merged.g_idx.weight_loader(merged.g_idx, g_idx.flip(0), 1)


def test_a_split_across_a_group_is_an_error(monkeypatch):
    _as_rank(monkeypatch, 0, 2)
    row = linear_mod.RowParallelLinear(24, 4, quant_config=PackedConfig(), prefix="o_proj")   # 12 per rank, packs of 8
    with pytest.raises(ValueError, match="o_proj: input shard of 12 features is not a whole number"):
        row.qweight.weight_loader(row.qweight, torch.zeros(3, 4, dtype=torch.int32))


def test_unquantized_layers_keep_their_shapes():
    layer = linear_mod.QKVParallelLinear(64, 16, 4, 2, bias=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    assert layer.weight.shape == (128, 64) and layer.bias.shape == (128,)
    assert type(layer.quant_method).__name__ == "UnquantizedLinearMethod"
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
