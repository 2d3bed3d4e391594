"""One QuantizationConfig per checkpoint format: read the checkpoint's quantization_config,
refuse what is not supported with a message naming it, and hand each linear layer its
method. lm_head and the embeddings are never quantized here."""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from pagedserve.layers.quantization.act_quant import FP8
from pagedserve.layers.quantization.base import LinearMethod, QuantizationConfig, checkpoint_names, skipped
from pagedserve.layers.quantization.bitsandbytes import BitsAndBytesInt8Method
from pagedserve.layers.quantization.formats_int4 import AWQMethod, CompressedTensorsW4A16, GPTQMethod
from pagedserve.layers.quantization.scaled import OnlineFp8Method, ScaledLinearMethod


def _int(config: dict[str, Any], key: str, what: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what}: quantization_config.{key} must be an integer, got {value!r}")
    return value


def _check_bits(bits: Any, what: str) -> None:
    if bits != 4:
        raise ValueError(f"{what}: only 4-bit weights are supported, the checkpoint has bits={bits!r}")


def _check_group(group: int, what: str) -> int:
    if group != -1 and (group <= 0 or group % 8):
        raise ValueError(f"{what}: group_size must be -1 or a positive multiple of 8, got {group}")
    return group


class CompressedTensorsConfig(QuantizationConfig):
    """llm-compressor's format: config_groups of (targets, weights, input_activations),
    `ignore` (names or re: patterns), format pack-quantized / int-quantized /
    float-quantized (naive-quantized too)."""

    name = "compressed-tensors"

    def __init__(self, config: dict[str, Any]) -> None:
        self.ignore = list(config.get("ignore") or [])
        fmt = config.get("format")
        if config.get("sparsity_config"):
            raise ValueError("compressed-tensors: sparsity_config (sparse checkpoints) is not supported")
        kv = config.get("kv_cache_scheme")
        if kv and (kv.get("type") != "float" or kv.get("num_bits") != 8 or kv.get("strategy", "tensor") != "tensor"
                   or kv.get("dynamic")):
            raise ValueError(f"compressed-tensors: kv_cache_scheme {kv} is not supported: only FP8 with static "
                             "per-tensor scales (self_attn.k_scale / v_scale, used under kv_cache_dtype fp8)")
        groups = config.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ValueError("compressed-tensors: quantization_config.config_groups is missing or empty")
        self.groups: list[tuple[list[str], dict[str, Any], dict[str, Any] | None, str]] = []
        for name, group in groups.items():
            weights = group.get("weights")
            if not weights:
                raise ValueError(f"compressed-tensors: config group {name!r} has no weights scheme")
            self.groups.append((list(group.get("targets") or []), weights, group.get("input_activations"),
                                group.get("format") or fmt))
        self._methods = [self._method(*group[1:]) for group in self.groups]   # bad schemes fail at start-up

    @staticmethod
    def _method(weights: dict[str, Any], inputs: dict[str, Any] | None, fmt: str | None):
        """The method factory of one scheme (called per layer: methods hold no layer state)."""
        kind, bits, strategy = weights.get("type", "int"), weights.get("num_bits"), weights.get("strategy")
        what = f"compressed-tensors scheme (weights {kind}{bits} {strategy}, format {fmt})"
        if weights.get("dynamic"):
            raise ValueError(f"{what}: dynamic weight quantization is not supported")
        if inputs is None:
            if kind == "int" and fmt == "pack-quantized":
                _check_bits(bits, what)
                if strategy == "group":
                    group = _check_group(_int(weights, "group_size", what), what)
                elif strategy == "channel":
                    group = -1
                else:
                    raise ValueError(f"{what}: pack-quantized strategy must be group or channel")
                has_g_idx = weights.get("actorder") == "group"
                symmetric = bool(weights.get("symmetric", True))
                return lambda: CompressedTensorsW4A16(group, symmetric, has_g_idx)
            if kind == "float" and bits == 8:
                block = _block(weights, what)
                return lambda: ScaledLinearMethod(FP8, strategy, None, block)
            raise ValueError(f"{what}: weight-only schemes supported are int4 pack-quantized and fp8")
        if inputs.get("type", "int") != kind or bits != 8 or inputs.get("num_bits") != 8:
            raise ValueError(f"{what}: with activations quantized, supported are W8A8 int8 and FP8")
        if not weights.get("symmetric", True) or not inputs.get("symmetric", True):
            raise ValueError(f"{what}: asymmetric 8-bit weights or activations are not supported")
        act_strategy, dynamic = inputs.get("strategy"), bool(inputs.get("dynamic"))
        if dynamic and act_strategy == "token":
            activations = "token"
        elif dynamic and act_strategy == "group" and strategy == "block":
            activations = "group"
        elif not dynamic and act_strategy == "tensor":
            activations = "static"
        else:
            raise ValueError(f"{what}: activations {act_strategy} dynamic={dynamic} are not supported (dynamic per "
                             "token, static per tensor, dynamic per group with block weights)")
        if strategy not in ("tensor", "channel", "block") or (strategy == "block" and kind != "float"):
            raise ValueError(f"{what}: weight strategy {strategy!r} is not supported")
        dtype = FP8 if kind == "float" else torch.int8
        block = _block(weights, what)
        return lambda: ScaledLinearMethod(dtype, strategy, activations, block)

    def _matches(self, target: str, name: str) -> bool:
        if target.startswith("re:"):
            return re.match(target[3:], name) is not None
        return target == name or name.endswith("." + target)

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        names = checkpoint_names(prefix)
        ignored = [any(self._matches(pattern, name) for pattern in self.ignore) for name in names]
        if all(ignored):
            return None
        if any(ignored):
            raise ValueError(f"compressed-tensors: {prefix} fuses {names}, but only some are in `ignore`")
        picked = set()
        for name in names:
            for index, (targets, *_rest) in enumerate(self.groups):
                if any(t == "Linear" or self._matches(t, name) for t in targets):
                    picked.add(index)
                    break
            else:
                picked.add(None)
        if picked == {None}:
            return None
        if len(picked) > 1:
            raise ValueError(f"compressed-tensors: {prefix} fuses {names}, which have different schemes")
        return self._methods[picked.pop()]()


def _block(weights: dict[str, Any], what: str) -> tuple[int, int] | None:
    if weights.get("strategy") != "block":
        return None
    block = weights.get("block_structure")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"{what}: block_structure must be [rows, cols], got {block!r}")
    return tuple(block)


class GPTQConfig(QuantizationConfig):
    name = "gptq"

    def __init__(self, config: dict[str, Any]) -> None:
        _check_bits(config.get("bits"), "gptq")
        self.group_size = _check_group(_int(config, "group_size", "gptq"), "gptq")
        self.desc_act = bool(config.get("desc_act", False))
        fmt = config.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"gptq: checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        self.zero_offset = 1 if fmt == "gptq" else 0
        if config.get("modules_in_block_to_quantize") or config.get("dynamic"):
            raise ValueError("gptq: per-module quantization (dynamic / modules_in_block_to_quantize) is not supported")

    def get_linear_method(self, layer, prefix):
        return GPTQMethod(self.group_size, self.desc_act, self.zero_offset)


class AWQConfig(QuantizationConfig):
    name = "awq"

    def __init__(self, config: dict[str, Any]) -> None:
        _check_bits(config.get("bits", config.get("w_bit")), "awq")
        self.group_size = _check_group(_int(config, "group_size" if "group_size" in config else "q_group_size",
                                            "awq"), "awq")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"awq: version {version!r} is not supported (GEMM layout only)")
        if config.get("zero_point", True) is False:
            raise ValueError("awq: zero_point=false is not supported")
        self.skip = list(config.get("modules_to_not_convert") or [])

    def get_linear_method(self, layer, prefix):
        if skipped(self.skip, prefix):
            return None
        return AWQMethod(self.group_size)


class Fp8Config(QuantizationConfig):
    """quant_method "fp8": HF's serialized FP8 (weight_block_size: block scales named
    weight_scale_inv, dynamic per-group activations; without it per-tensor weight_scale and
    dynamic or static activation_scheme), or online (quantization="fp8" on a float checkpoint)."""

    name = "fp8"

    def __init__(self, config: dict[str, Any]) -> None:
        self.online = bool(config.get("online"))
        self.weight_strategy = config.get("weight_strategy", "tensor")
        self.block = config.get("weight_block_size")
        scheme = config.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"fp8: activation_scheme {scheme!r} is not supported (dynamic, static)")
        if self.block is not None:
            if not (isinstance(self.block, (list, tuple)) and len(self.block) == 2) or scheme != "dynamic":
                raise ValueError(f"fp8: weight_block_size must be [rows, cols] with dynamic activations, got "
                                 f"{self.block!r} / {scheme}")
            self.block = tuple(self.block)
        self.activations = "token" if scheme == "dynamic" else "static"
        if config.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"fp8: fmt {config.get('fmt')!r} is not supported (e4m3)")
        self.skip = list(config.get("modules_to_not_convert") or config.get("ignored_layers") or [])

    def get_linear_method(self, layer, prefix):
        if skipped(self.skip, prefix):
            return None
        if self.online:
            return OnlineFp8Method(self.weight_strategy)
        if self.block is not None:
            return ScaledLinearMethod(FP8, "block", "group", self.block, scale_name="weight_scale_inv")
        return ScaledLinearMethod(FP8, "tensor", self.activations)


class BitsAndBytesConfig(QuantizationConfig):
    """transformers' BitsAndBytesConfig with load_in_8bit (LLM.int8); online when
    quantization="bitsandbytes" meets a float checkpoint (TGI's QUANTIZE=bitsandbytes)."""

    name = "bitsandbytes"

    def __init__(self, config: dict[str, Any]) -> None:
        if config.get("load_in_4bit"):
            raise ValueError("bitsandbytes: 4-bit (nf4 / fp4) checkpoints are not supported; 8-bit (LLM.int8) is")
        if not config.get("load_in_8bit"):
            raise ValueError("bitsandbytes: the quantization_config has neither load_in_8bit nor load_in_4bit")
        if config.get("llm_int8_has_fp16_weight"):
            raise ValueError("bitsandbytes: llm_int8_has_fp16_weight checkpoints are not supported")
        self.threshold = float(config.get("llm_int8_threshold", 6.0))
        self.online = bool(config.get("online"))
        self.skip = list(config.get("llm_int8_skip_modules") or [])

    def get_linear_method(self, layer, prefix):
        if skipped(self.skip, prefix):
            return None
        return BitsAndBytesInt8Method(self.threshold, self.online)
