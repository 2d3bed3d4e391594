"""The tests' reference for quantized checkpoints: pure torch, independent of pagedserve.
Each format's dequantizer turns a checkpoint's tensors into float weights; activation
schemes (W8A8, FP8, LLM.int8) are emulated by a hook on the input of each nn.Linear. The
reference model is transformers' own model with those weights and hooks.

The generator (tests/fixtures/quant/make_fixtures.py) compared these against the producing
library's own forward when it wrote the fixtures; MANIFEST.json records the differences."""
from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file

FP8 = torch.float8_e4m3fn


def _nibbles(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> their 8 unsigned 4-bit values along `dim` (value i in bits 4i..4i+3)."""
    parts = [(packed >> (4 * i)) & 0xF for i in range(8)]
    stacked = torch.stack(parts, dim=dim + 1)
    shape = list(packed.shape)
    shape[dim] *= 8
    return stacked.reshape(shape)


def dequant_ct_packed(t: dict, scheme: dict) -> torch.Tensor:
    q = _nibbles(t["weight_packed"], 1).float() - 8                       # [N, K], signed
    scale = t["weight_scale"].float()                                     # [N, G]
    n, k = q.shape
    if "weight_zero_point" in t:
        zp = _nibbles(t["weight_zero_point"], 0)[:n].float() - 8          # [N, G]
    else:
        zp = torch.zeros_like(scale)
    if "weight_g_idx" in t:
        groups = t["weight_g_idx"].long()
    else:
        groups = torch.arange(k) // (scheme["group_size"] if scheme["strategy"] == "group" else k)
    return (q - zp[:, groups]) * scale[:, groups]


def dequant_scaled(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """8-bit weight [N, K] times a per-tensor, per-channel [N, 1] or block [N/bn, K/bk] scale."""
    weight, scale = weight.float(), scale.float()
    if scale.numel() == 1 or scale.shape == (weight.shape[0], 1):
        return weight * scale.reshape(-1, 1) if scale.numel() > 1 else weight * scale.reshape(())
    bn, bk = -(-weight.shape[0] // scale.shape[0]), -(-weight.shape[1] // scale.shape[1])
    full = scale.repeat_interleave(bn, 0)[:weight.shape[0]].repeat_interleave(bk, 1)[:, :weight.shape[1]]
    return weight * full


def dequant_gptq(t: dict, config: dict) -> torch.Tensor:
    q = _nibbles(t["qweight"], 0).float()                                 # [K, N]
    zeros = _nibbles(t["qzeros"], 1).float() + (1 if config.get("checkpoint_format", "gptq") == "gptq" else 0)
    k = q.shape[0]
    groups = t["g_idx"].long() if config.get("desc_act") else torch.arange(k) // (
        config["group_size"] if config["group_size"] != -1 else k)
    return ((q - zeros[groups]) * t["scales"].float()[groups]).t()


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    nibbles = _nibbles(packed, 1).reshape(packed.shape[0], -1, 8)         # nibble order
    out = torch.empty_like(nibbles)
    for i, column in enumerate(AWQ_ORDER):
        out[..., column] = nibbles[..., i]
    return out.reshape(packed.shape[0], -1)


def dequant_awq(t: dict, config: dict) -> torch.Tensor:
    q, zeros = _awq_unpack(t["qweight"]).float(), _awq_unpack(t["qzeros"]).float()
    groups = torch.arange(q.shape[0]) // config["group_size"]
    return ((q - zeros[groups]) * t["scales"].float()[groups]).t()


# ---- activations -------------------------------------------------------------------------
def fake_quant_per_token(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    qmax = 127.0 if dtype == torch.int8 else 448.0
    scale = (x.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-12)
    return _cast(x / scale, dtype) * scale


def fake_quant_static(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return _cast(x / scale, dtype) * scale


def fake_quant_per_group(x: torch.Tensor, group: int) -> torch.Tensor:
    shape = x.shape
    x = x.reshape(*shape[:-1], -1, group)
    return fake_quant_per_token(x, FP8).reshape(shape)


def _cast(scaled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.int8:
        return scaled.round().clamp(-128, 127)
    return scaled.clamp(-448, 448).to(FP8).float()


def llm_int8_linear(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, threshold: float) -> torch.Tensor:
    """bitsandbytes' LLM.int8 forward, one token at a time: the token's input columns holding
    a value >= threshold run in float against the dequantized weight columns; the rest is
    int8 x int8 with absmax scales (the token's, the weight row's)."""
    w = cb.float() * scb.float()[:, None] / 127
    rows = []
    for token in x.reshape(-1, x.shape[-1]).float():
        outliers = token.abs() >= threshold
        regular = token.masked_fill(outliers, 0)
        x_scale = regular.abs().amax().clamp(min=1e-12) / 127
        xq = (regular / x_scale).round().clamp(-127, 127)
        rows.append((cb.float() @ xq) * x_scale * scb.float() / 127 + w[:, outliers] @ token[outliers])
    out = torch.stack(rows)
    return out.reshape(*x.shape[:-1], -1).to(x.dtype)


# ---- the model ---------------------------------------------------------------------------
def reference_model(path: str):
    """transformers' LlamaForCausalLM with the checkpoint dequantized (fp32) and the
    activation scheme emulated."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    qconfig = raw.pop("quantization_config")
    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")})
    config.architectures = raw.get("architectures")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state, hooks = {}, {}
    layers = sorted({name.rsplit(".", 1)[0] for name in tensors if re.search(r"_proj\.", name)})
    for layer in layers:
        t = {name[len(layer) + 1:]: value for name, value in tensors.items() if name.startswith(layer + ".")}
        state[layer + ".weight"], hooks[layer] = _dequant_layer(t, qconfig)
    for name, value in tensors.items():
        if name.rsplit(".", 1)[0] not in layers:
            state[name] = value.float()
    missing = model.load_state_dict(state, strict=False)
    assert not [m for m in missing.missing_keys if "rotary" not in m], missing.missing_keys
    for layer, hook in hooks.items():
        module = model.get_submodule(layer)
        if hook is not None:
            module.forward = _hooked(module, hook)
    return model


def _hooked(module, hook):
    def forward(x):
        return hook(x, module.weight)
    return forward


def _dequant_layer(t: dict, q: dict):
    method = q.get("quant_method")
    if method == "compressed-tensors":
        group = next(iter(q["config_groups"].values()))
        weights, inputs = group["weights"], group.get("input_activations")
        if "weight_packed" in t:
            return dequant_ct_packed(t, weights), None
        weight = dequant_scaled(t["weight"], t["weight_scale"])
        dtype = FP8 if weights["type"] == "float" else torch.int8
        if inputs is None:
            return weight, None
        if inputs["strategy"] == "token":
            return weight, lambda x, w: torch.nn.functional.linear(fake_quant_per_token(x, dtype), w)
        if inputs["strategy"] == "group":
            return weight, lambda x, w: torch.nn.functional.linear(fake_quant_per_group(x, inputs["group_size"]), w)
        scale = float(t["input_scale"].reshape(()))
        return weight, lambda x, w: torch.nn.functional.linear(fake_quant_static(x, scale, dtype), w)
    if method == "gptq":
        return dequant_gptq(t, q), None
    if method == "awq":
        return dequant_awq(t, q), None
    if method == "fp8":
        bk = q["weight_block_size"][1]
        weight = dequant_scaled(t["weight"], t["weight_scale_inv"])
        return weight, lambda x, w: torch.nn.functional.linear(fake_quant_per_group(x, bk), w)
    if method == "bitsandbytes":
        cb, scb, threshold = t["weight"], t["SCB"], q.get("llm_int8_threshold", 6.0)
        return cb.float() * scb.float()[:, None] / 127, lambda x, w: llm_int8_linear(x, cb, scb, threshold)
    raise KeyError(method)


def online_reference(path: str, method: str):
    """A float checkpoint quantized at load as pagedserve's quantization=`method` promises:
    fp8 (one scale per projection), fp8-per-channel (one per row), both with per-token FP8
    activations; bitsandbytes (row absmax int8, LLM.int8 forward at threshold 6)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "lm_head" in name:
            continue
        w = module.weight.data.float()
        if method.startswith("fp8"):
            amax = w.abs().amax(1, keepdim=True) if method == "fp8-per-channel" else w.abs().amax()
            scale = (amax / 448).clamp(min=1e-12)
            module.weight.data = (w / scale).clamp(-448, 448).to(FP8).float() * scale
            module.forward = _hooked(module, lambda x, weight: torch.nn.functional.linear(
                fake_quant_per_token(x, FP8), weight))
        else:
            scb = w.abs().amax(1).clamp(min=1e-12)
            cb = (w * 127 / scb[:, None]).round().clamp(-127, 127)
            module.weight.data = cb * scb[:, None] / 127
            module.forward = _hooked(module, lambda x, weight, cb=cb, scb=scb: llm_int8_linear(x, cb, scb, 6.0))
    return model
