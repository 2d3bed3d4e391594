"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors / .bin): read whole and
checked against the model once, when registered (load_adapter, from frontend/lora_registry.py;
inspect_adapter checks names, shapes and dtypes only), as factors per module, mapped onto the
decoder layers' linears (models/llama.py's enable_lora / set_lora). Adapter folders are
untrusted input: every adapter_config.json field read here is checked for PEFT's type and
range, and any fault is a ValidationError naming the caller's parameter.

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


@dataclass(frozen=True)
class _Config:
    """What adapter_config.json says that matters here, checked (_config)."""

    alpha: float
    alpha_pattern: tuple[tuple[re.Pattern, float], ...]   # (module pattern, its lora_alpha), in order
    use_rslora: bool


_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAMES = {dtype: name for name, dtype in _FLOAT_DTYPES.items()}


def _shown(value: Any) -> str:
    """A config value as its JSON, cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: Any, integer: bool) -> float | None:
    """A JSON number as PEFT takes it: a finite one, or an integer >= 1; None if it is not."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return None
    if integer:
        return value if value >= 1 else None
    try:
        value = float(value)
    except OverflowError:   # an integer past float's range
        return None
    return value if math.isfinite(value) else None


def _config(path: str, param: str) -> _Config:
    """adapter_config.json, every field read here checked: PEFT's types and ranges, patterns that
    compile, and the features this engine does not run refused by name."""
    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as exc:   # RecursionError: JSON nested too deep
        raise ValidationError(f"cannot read the LoRA adapter at {path!r} (adapter_config.json): {exc}", param) from exc
    if not isinstance(config, dict):
        raise ValidationError(f"{path}/adapter_config.json is not a JSON object", param)

    def bad(field: str, should: str) -> ValidationError:
        return ValidationError(f"adapter {path!r}: adapter_config.json's {field} must be {should}, got "
                               f"{_shown(config[field])}", param)

    def flag(field: str) -> bool:   # PEFT's booleans; null (or absent) is PEFT's default, false
        value = config.get(field)
        if value is not None and not isinstance(value, bool):
            raise bad(field, "true or false")
        return bool(value)

    def number(field: str, value: Any, integer: bool = False) -> float:
        checked = _number(value, integer)
        if checked is None:
            raise bad(field, "an integer >= 1" if integer else "a finite number")
        return checked

    def patterns(field: str, integer: bool) -> tuple[tuple[re.Pattern, float], ...]:
        value = config.get(field)
        if value is None:
            return ()
        if not isinstance(value, dict):
            raise bad(field, "an object of module name patterns")
        compiled = []
        for pattern, item in value.items():
            try:
                re.compile(pattern)   # its own error first (positions in its own text)
                regex = re.compile(rf"(^|\.){pattern}$")
            except re.error as exc:
                raise ValidationError(f"adapter {path!r}: adapter_config.json's {field} pattern {_shown(pattern)} is "
                                      f"not a regular expression ({exc})", param) from None
            checked = _number(item, integer)
            if checked is None:
                raise ValidationError(f"adapter {path!r}: adapter_config.json's {field} gives {_shown(pattern)} "
                                      f"{_shown(item)}: {'an integer >= 1' if integer else 'a finite number'} "
                                      "is needed", param)
            compiled.append((regex, checked))
        return tuple(compiled)

    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValidationError(f"adapter {path!r} is {_shown(peft_type)} (peft_type), not LoRA", param)
    if flag("use_dora"):
        raise ValidationError(f"adapter {path!r}: DoRA (use_dora) is not supported", param)
    bias = config.get("bias")
    if bias in ("all", "lora_only"):
        raise ValidationError(f"adapter {path!r}: trained biases (bias) is not supported", param)
    if bias not in (None, "none"):
        raise bad("bias", '"none", "all" or "lora_only"')
    saved = config.get("modules_to_save")
    if saved is not None and not isinstance(saved, list):
        raise bad("modules_to_save", "a list of module names or null")
    if saved:
        raise ValidationError(f"adapter {path!r}: saved modules (modules_to_save) are not supported", param)
    targets = config.get("target_modules")   # which modules PEFT wrapped: the factors themselves decide here
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise ValidationError(f"adapter {path!r}: adapter_config.json's target_modules {_shown(targets)} is not a "
                                  f"regular expression ({exc})", param) from None
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise bad("target_modules", "a list of module names or a regular expression")
    if "r" in config:   # each module's rank is its factors' (rank_pattern's when PEFT trained it so)
        number("r", config["r"], integer=True)
    patterns("rank_pattern", integer=True)
    alpha = number("lora_alpha", config["lora_alpha"]) if "lora_alpha" in config else 8.0   # PEFT's default
    return _Config(alpha, patterns("alpha_pattern", integer=False), flag("use_rslora"))


def _weights_file(path: str, param: str) -> str:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise ValidationError(f"the LoRA adapter at {path!r} has no adapter_model.safetensors", param)


_SIZE_SLACK = 64 << 20   # a weights file's header / pickle framing, beyond its tensors' bytes


def _check_size(path: str, module_shapes: dict[str, tuple[int, int]], max_rank: int, param: str) -> None:
    """The weights file no larger than any adapter of this model can be (every module targeted at
    max_rank in 8-byte values): it is read whole into memory, so a larger one is refused before
    a byte of it is read."""
    file = _weights_file(path, param)
    bound = 8 * max_rank * sum(fan_in + fan_out for fan_in, fan_out in module_shapes.values()) + _SIZE_SLACK
    size = os.path.getsize(file)
    if size > bound:
        raise ValidationError(f"the LoRA adapter at {path!r} has a weights file of {size} bytes, more than any "
                              f"adapter of this model up to rank {max_rank} holds ({bound} bytes)", param)


def _read(path: str, param: str, shapes_only: bool) -> dict[str, tuple[tuple[int, ...], str, torch.Tensor | None]]:
    """The weights file's tensors: name -> (shape, dtype name (safetensors'), the tensor unless
    `shapes_only`)."""
    file = _weights_file(path, param)
    try:
        if file.endswith(".safetensors") and shapes_only:
            from safetensors import safe_open
            with safe_open(file, "pt") as f:
                return {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype(), None)
                        for key in f.keys()}
        if file.endswith(".safetensors"):
            from safetensors.torch import load
            with open(file, "rb") as f:   # into memory: load_file's mapped tensors fault (SIGBUS) once it is rewritten
                tensors = load(f.read())
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError("not a mapping of names to tensors")
    except Exception as exc:
        raise ValidationError(f"cannot read the LoRA adapter at {path!r}: {exc}", param) from exc
    return {str(key): (tuple(t.shape), _DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch.")),
                       None if shapes_only else t) for key, t in tensors.items()}


def _scaling(module: str, rank: int, config: _Config) -> float:
    alpha = config.alpha
    for pattern, value in config.alpha_pattern:
        if pattern.search(module):
            alpha = value
    return alpha / (math.sqrt(rank) if config.use_rslora else rank)


def _check(path: str, config: _Config, tensors: dict[str, tuple], module_shapes: dict[str, tuple[int, int]],
           max_rank: int, param: str) -> tuple[AdapterInfo, dict[str, dict[str, str]]]:
    """The factors against the model: every module one of `module_shapes`, its A [r, in] and
    B [out, r] floating-point matrices that fit it, 1 <= r <= max_rank. Returns the info and each
    module's tensor names ({"A": ..., "B": ...})."""
    keys: dict[str, dict[str, str]] = {}
    for key, (shape, dtype, _) in tensors.items():
        match = _KEY.match(key.removeprefix(_PREFIX))
        if match is None:
            raise ValidationError(f"adapter {path!r}: tensor {key!r} is not a LoRA factor of a linear layer "
                                  "(embedding LoRA, DoRA magnitudes and saved modules are not supported)", param)
        if len(shape) != 2:
            raise ValidationError(f"adapter {path!r}: tensor {key!r} of shape {list(shape)} is not a matrix", param)
        if dtype not in _FLOAT_DTYPES:
            raise ValidationError(f"adapter {path!r}: tensor {key!r} has dtype {dtype}: LoRA factors are float32, "
                                  "float16, bfloat16 or float64", param)
        pair = keys.setdefault(match["module"], {})
        if match["factor"] in pair:
            raise ValidationError(f"adapter {path!r}: {match['module']}'s lora_{match['factor']} is there twice "
                                  f"({pair[match['factor']]!r} and {key!r})", param)
        pair[match["factor"]] = key
    if not keys:
        raise ValidationError(f"adapter {path!r} holds no LoRA factors", param)
    modules = {}
    for module, pair in sorted(keys.items()):
        if module not in module_shapes:
            raise ValidationError(f"adapter {path!r} targets {module!r}: LoRA is supported on the attention and "
                                  "MLP projections of the decoder layers only", param)
        if set(pair) != {"A", "B"}:
            raise ValidationError(f"adapter {path!r}: {module} lacks its lora_{'B' if 'A' in pair else 'A'}", param)
        a_shape, b_shape = tensors[pair["A"]][0], tensors[pair["B"]][0]
        (rank, in_features), (out_features, rank_b) = a_shape, b_shape
        if (in_features, out_features) != module_shapes[module] or rank != rank_b:
            raise ValidationError(f"adapter {path!r}: {module}'s factors {a_shape} / {b_shape} do not fit the "
                                  f"layer (in {module_shapes[module][0]}, out {module_shapes[module][1]}): an adapter "
                                  "of another base model?", param)
        if rank < 1:
            raise ValidationError(f"adapter {path!r}: {module}'s factors have rank 0", param)
        if rank > max_rank:
            raise ValidationError(f"adapter {path!r}: rank {rank} of {module} exceeds max_lora_rank {max_rank} "
                                  "(--max-lora-rank)", param)
        modules[module] = (rank, in_features, out_features, _scaling(module, rank, config))
    return AdapterInfo(path, max(m[0] for m in modules.values()), modules), keys


def inspect_adapter(path: str, module_shapes: dict[str, tuple[int, int]], max_rank: int,
                    param: str = "lora_request") -> AdapterInfo:
    """Check an adapter folder against the model: its adapter_config.json (_config), every module
    it targets one of `module_shapes` (name -> (in, out) of the unsharded layer), A and B fit it,
    ranks <= max_rank. Reads names, shapes and dtypes only. Raises ValidationError naming `param`."""
    config = _config(path, param)
    return _check(path, config, _read(path, param, shapes_only=True), module_shapes, max_rank, param)[0]


def load_adapter(path: str, module_shapes: dict[str, tuple[int, int]], max_rank: int, param: str = "lora_request",
                 dtype: torch.dtype | None = None) -> tuple[AdapterInfo, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read an adapter folder whole and check it as inspect_adapter does: its info and module ->
    (A [r, in], B * scaling [out, r]) on the CPU, in `dtype` if given (the model's: what the
    device slots hold). Every value must be finite (in `dtype`): a NaN or an infinity in one
    slot's factors would reach every token of a step that runs any adapter (another slot's
    columns are masked by a multiplication by zero, and NaN * 0 is NaN). Raises ValidationError
    naming `param`."""
    config = _config(path, param)
    _check_size(path, module_shapes, max_rank, param)
    if _weights_file(path, param).endswith(".safetensors"):   # names and shapes from the header first
        _check(path, config, _read(path, param, shapes_only=True), module_shapes, max_rank, param)
    tensors = _read(path, param, shapes_only=False)
    info, keys = _check(path, config, tensors, module_shapes, max_rank, param)
    factors = {}
    for module, (_, _, _, scaling) in info.modules.items():
        pair = tensors[keys[module]["A"]][2], tensors[keys[module]["B"]][2].float() * scaling
        if dtype is not None:
            pair = tuple(factor.to(dtype) for factor in pair)
        for name, factor in zip(("lora_A", "lora_B * scaling"), pair):
            if not bool(torch.isfinite(factor).all()):
                raise ValidationError(f"adapter {path!r}: {module}'s {name} holds NaN or infinite values"
                                      + (f" (in {str(dtype).removeprefix('torch.')})" if dtype is not None else ""),
                                      param)
        factors[module] = pair
    return info, factors


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
