"""GGUF packed weights in the layers: a fused QKV layer and a row-parallel layer load raw
blocks through their weight_loader and multiply like the dequantized weight (the C++ GEMV:
with Q8 activations, the torch reference of its arithmetic bit for bit; with fp32 ones
(PAGEDSERVE_GGUF_Q8_ACT=0), within fp32 rounding; torch's int4 kernel, the fallback without a compiler: within bf16
rounding; int4=False: exact fp32); the embedding looks rows up exactly; llama.cpp's
q/k row permutation undone on packed rows equals undoing it on the dequantized rows."""
import numpy as np
import pytest
import torch

from pagedserve.layers.embedding import ParallelLMHead
from pagedserve.layers.linear import QKVParallelLinear, RowParallelLinear
from pagedserve.layers.quantization import gguf_cpu
from pagedserve.layers.quantization.gguf import CPP_MAX_ROWS, Q8_MAX_ROWS, GGUFConfig
from pagedserve.layers.quantization.gguf_kernels import dequantize
from pagedserve.models.gguf_packed import _unpermute
from tests.unit.test_gguf_kernels import random_blocks

pytest.importorskip("gguf")


def _blocks(fmt, rows, cols, seed):
    return torch.from_numpy(random_blocks(fmt, rows, cols, seed))


@pytest.mark.parametrize("path", ["cpp", "cpp_fp32_act", "int4", "fp32"])
def test_qkv_and_row_layers_multiply_like_dequantized(path, monkeypatch):
    if path.startswith("cpp") and gguf_cpu.extension() is None:
        pytest.skip("no C++ compiler for the GGUF CPU kernels")
    monkeypatch.setenv("PAGEDSERVE_GGUF_Q8_ACT", "0" if path == "cpp_fp32_act" else "1")
    if path == "int4":   # as on a machine without a compiler
        monkeypatch.setattr(gguf_cpu, "extension", lambda: None)
    int4 = path != "fp32"
    types = {f"l.self_attn.{p}.qweight": "Q4_1" for p in ("q_proj", "k_proj", "v_proj")}
    types["l.self_attn.o_proj.qweight"] = "Q8_0"
    config = GGUFConfig(types, int4=int4)
    qkv = QKVParallelLinear(64, 16, 4, 2, quant_config=config, prefix="l.self_attn.qkv_proj")
    o = RowParallelLinear(64, 64, quant_config=config, prefix="l.self_attn.o_proj")
    shards = {"q": _blocks("Q4_1", 64, 64, 1), "k": _blocks("Q4_1", 32, 64, 2), "v": _blocks("Q4_1", 32, 64, 3)}
    for shard_id, raw in shards.items():
        qkv.weight_loader(qkv.qweight, raw, shard_id)
    o_raw = _blocks("Q8_0", 64, 64, 4)
    o.weight_loader(o.qweight, o_raw)
    for layer in (qkv, o):
        layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(5, 64)
    for layer, weight in ((qkv, torch.cat([dequantize(r, "Q4_1") for r in shards.values()])),
                          (o, dequantize(o_raw, "Q8_0"))):
        out = layer(x)
        assert layer.gguf_cpp == path.startswith("cpp") and (layer.int4_parts is not None) == (path == "int4")
        assert layer.gguf_q8 == (path == "cpp")
        if path == "cpp":
            from tests.unit.test_gguf_cpu import q8_reference
            assert torch.equal(out, q8_reference(x, layer.qweight, layer.quant_method.fmt))
            batch = torch.randn(Q8_MAX_ROWS, 64)   # the Q8 GEMM up to Q8_MAX_ROWS rows: the same arithmetic
            assert torch.equal(layer(batch), q8_reference(batch, layer.qweight, layer.quant_method.fmt))
        if path.startswith("cpp"):
            if path == "cpp_fp32_act":
                assert torch.allclose(out, x @ weight.t(), rtol=1e-5, atol=1e-5)
            # more rows: a GEMM on the weight dequantized per call (bf16 or fp32: gemm_dtype)
            many = torch.randn((Q8_MAX_ROWS if path == "cpp" else CPP_MAX_ROWS) + 1, 64)
            ref = many.bfloat16().float() @ weight.bfloat16().float().t()
            assert (layer(many) - ref).abs().max() <= 1e-2 * ref.abs().max()
        elif path == "int4":
            ref = x.bfloat16().float() @ weight.t()
            assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()
        else:
            assert torch.equal(out, torch.nn.functional.linear(x, weight))


def test_embedding_rows_exact_and_logits():
    config = GGUFConfig({"model.embed_tokens.qweight": "Q8_0"})
    method = config.get_embedding_method("model.embed_tokens")
    embed = ParallelLMHead(96, 64, torch.float32, method)
    raw = _blocks("Q8_0", 96, 64, 5)
    embed.weight_loader(embed.qweight, raw)
    method.process_weights_after_loading(embed)
    ids = torch.tensor([3, 95, 0, 3])
    weight = dequantize(raw, "Q8_0")
    assert torch.equal(embed(ids), weight[ids])
    hidden = torch.randn(2, 64)
    ref = hidden.bfloat16().float() @ weight.t()
    assert (embed.compute_logits(hidden) - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_unpermute_on_packed_rows_is_exact():
    raw = random_blocks("Q4_1", 64, 64, 6)
    packed_then_dequant = dequantize(torch.from_numpy(_unpermute(raw, 4)), "Q4_1")
    dequant_then_unpermute = _unpermute(dequantize(torch.from_numpy(raw), "Q4_1").numpy(), 4)
    assert np.array_equal(packed_then_dequant.numpy(), dequant_then_unpermute)
