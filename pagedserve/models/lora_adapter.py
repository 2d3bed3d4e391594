"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors / .bin): read and checked
against the model before any request uses one (frontend), loaded as factors per module (worker)
and mapped onto the decoder layers' linears (models/llama.py's enable_lora / set_lora).

Tensor names are PEFT's: `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight`
[out, r], <module> a name of the base model (model.layers.3.self_attn.q_proj). Each module's
scaling is lora_alpha / r (alpha_pattern / rank_pattern per module; use_rslora: / sqrt(r)), and is
folded into B at load. Not supported, and refused by name: DoRA, trained biases, modules_to_save,
and targets outside the decoder layers' linears (embeddings, lm_head, experts)."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from pagedserve.config import ModelConfig
from pagedserve.errors import ValidationError

# an adapter's module (within model.layers.N.) -> (the linear that holds it here, shard id)
LORA_TARGETS = {"self_attn.q_proj": ("self_attn.qkv_proj", "q"), "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
                "self_attn.v_proj": ("self_attn.qkv_proj", "v"), "self_attn.o_proj": ("self_attn.o_proj", None),
                "mlp.gate_proj": ("mlp.gate_up_proj", 0), "mlp.up_proj": ("mlp.gate_up_proj", 1),
                "mlp.down_proj": ("mlp.down_proj", None)}
LINEAR_SLICES = {"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": (0, 1)}   # Phi-3's fused ones
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class AdapterInfo:
    """What the frontend checked: the largest rank, and each module's (rank, in, out, scaling)."""

    path: str
    max_rank: int
    modules: dict[str, tuple[int, int, int, float]]


def _config(path: str, param: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValidationError(f"cannot read the LoRA adapter at {path!r} (adapter_config.json): {exc}", param) from exc
    if not isinstance(config, dict):
        raise ValidationError(f"{path}/adapter_config.json is not a JSON object", param)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValidationError(f"adapter {path!r} is {config.get('peft_type')}, not LoRA", param)
    for key, ok, why in (("use_dora", not config.get("use_dora"), "DoRA"),
                         ("bias", config.get("bias", "none") == "none", "trained biases"),
                         ("modules_to_save", not config.get("modules_to_save"), "modules_to_save")):
        if not ok:
            raise ValidationError(f"adapter {path!r}: {why} ({key}) is not supported", param)
    return config


def _weights_file(path: str) -> str:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise ValidationError(f"the LoRA adapter at {path!r} has no adapter_model.safetensors", "lora_request")


def _shapes(file: str) -> dict[str, tuple[int, ...]]:
    if file.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(file, "pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    return {key: tuple(t.shape) for key, t in torch.load(file, map_location="cpu", weights_only=True).items()}


def _scaling(module: str, rank: int, config: dict[str, Any]) -> float:
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module):
            alpha = value
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def inspect_adapter(path: str, module_shapes: dict[str, tuple[int, int]], max_rank: int,
                    param: str = "lora_request") -> AdapterInfo:
    """Check an adapter folder against the model: every module it targets is one of
    `module_shapes` (name -> (in, out) of the unsharded layer), A and B fit it, ranks <= max_rank.
    Reads names and shapes only."""
    config = _config(path, param)
    try:
        shapes = _shapes(_weights_file(path))
    except ValidationError as exc:
        raise ValidationError(str(exc), param) from exc
    except Exception as exc:
        raise ValidationError(f"cannot read the LoRA adapter at {path!r}: {exc}", param) from exc
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        match = _KEY.match(key.removeprefix(_PREFIX))
        if match is None:
            raise ValidationError(f"adapter {path!r}: tensor {key!r} is not a LoRA factor of a linear layer "
                                  "(embedding LoRA, DoRA magnitudes and saved modules are not supported)", param)
        factors.setdefault(match["module"], {})[match["factor"]] = shape
    if not factors:
        raise ValidationError(f"adapter {path!r} holds no LoRA factors", param)
    modules = {}
    for module, pair in sorted(factors.items()):
        if module not in module_shapes:
            raise ValidationError(f"adapter {path!r} targets {module!r}: LoRA is supported on the attention and "
                                  "MLP projections of the decoder layers only", param)
        if set(pair) != {"A", "B"}:
            raise ValidationError(f"adapter {path!r}: {module} lacks its lora_{'B' if 'A' in pair else 'A'}", param)
        (rank, in_features), (out_features, rank_b) = pair["A"], pair["B"]
        if (in_features, out_features) != module_shapes[module] or rank != rank_b:
            raise ValidationError(f"adapter {path!r}: {module}'s factors {pair['A']} / {pair['B']} do not fit the "
                                  f"layer (in {module_shapes[module][0]}, out {module_shapes[module][1]}): an adapter "
                                  "of another base model?", param)
        if rank > max_rank:
            raise ValidationError(f"adapter {path!r}: rank {rank} of {module} exceeds max_lora_rank {max_rank} "
                                  "(--max-lora-rank)", param)
        modules[module] = (rank, in_features, out_features, _scaling(module, rank, config))
    return AdapterInfo(path, max(m[0] for m in modules.values()), modules)


def load_adapter(path: str, modules: dict[str, tuple[int, int, int, float]]
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A [r, in], B * scaling [out, r]) on the CPU, for an adapter inspect_adapter passed."""
    file = _weights_file(path)
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file
        tensors = load_file(file)
    else:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key.removeprefix(_PREFIX))
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    return {module: (factors[module]["A"], factors[module]["B"].float() * scaling)
            for module, (_, _, _, scaling) in modules.items()}


def lora_module_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """The modules a LoRA adapter may target in this model, (in, out) of each unsharded: the
    attention and dense MLP projections of every layer, and Phi-3's fused qkv_proj / gate_up_proj
    (what its checkpoints, and so its adapters, name)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
              "self_attn.o_proj": (q, hidden)}
    dense = {"mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden)}
    if config.architecture == "Phi3ForCausalLM":
        shapes = {"self_attn.qkv_proj": (hidden, q + 2 * kv), "self_attn.o_proj": (q, hidden)}
        dense = {"mlp.gate_up_proj": (hidden, 2 * inter), "mlp.down_proj": (inter, hidden)}
    return {f"model.layers.{i}.{name}": shape for i in range(config.num_layers)
            for name, shape in (shapes | ({} if i in config.moe_layers else dense)).items()}


def lora_linears(layer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """A decoder layer's linears that carry adapters: attention's, and the dense MLP's (not experts')."""
    names = ["self_attn.qkv_proj", "self_attn.o_proj"] + ([] if layer.moe else ["mlp.gate_up_proj", "mlp.down_proj"])
    return {name: layer.get_submodule(name) for name in names}


def factors_by_linear(config: ModelConfig, layer_index: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
                      ) -> dict[str, dict]:
    """Layer `layer_index`'s part of an adapter's factors (load_adapter's), by the linear that
    holds them: {linear name: {shard id: (A, B)}}; Phi-3's fused projections' one B is split by
    the slices' sizes (one A for all)."""
    fused_sizes = {"self_attn.qkv_proj": [config.num_heads * config.head_dim] + [config.num_kv_heads * config.head_dim] * 2,
                   "mlp.gate_up_proj": [config.intermediate_size] * 2}
    prefix = f"model.layers.{layer_index}."
    by_linear: dict[str, dict] = {}
    for name, (a, b) in factors.items():
        if not name.startswith(prefix):
            continue
        module = name[len(prefix):]
        if module in fused_sizes:
            by_linear.setdefault(module, {}).update(dict(zip(LINEAR_SLICES[module], ((a, part) for part in
                                                                                    b.split(fused_sizes[module])))))
        else:
            linear, shard = LORA_TARGETS[module]
            by_linear.setdefault(linear, {})[shard] = (a, b)
    return by_linear
