"""Quantized linear layers: a QuantizationConfig per checkpoint format hands every linear
layer its LinearMethod (base.py). `get_quantization_config(spec)` builds the config of a
ModelConfig's QuantizationSpec; None means plain float weights."""
from __future__ import annotations

from typing import Any, Callable

from pagedserve.config import QuantizationSpec
from pagedserve.layers.quantization.base import (CheckpointTensor, LinearMethod, QuantizationConfig, make_param,
                                                 replace_param)
from pagedserve.layers.quantization.unquantized import UnquantizedLinearMethod

__all__ = ["CheckpointTensor", "LinearMethod", "QuantizationConfig", "UnquantizedLinearMethod", "make_param",
           "replace_param", "embedding_method", "get_quantization_config", "register_quantization",
           "QUANTIZATION_METHODS"]

# canonical method name -> config class (register_quantization adds more)
QUANTIZATION_METHODS: dict[str, Callable[[dict], QuantizationConfig]] = {}


def register_quantization(name: str, factory: Callable[[dict], QuantizationConfig]) -> None:
    QUANTIZATION_METHODS[name] = factory


def _register_builtin() -> None:
    from pagedserve.layers.quantization.configs import (AWQConfig, BitsAndBytesConfig, CompressedTensorsConfig,
                                                        Fp8Config, GPTQConfig)
    from pagedserve.layers.quantization.gguf import GGUFConfig
    for config in (CompressedTensorsConfig, GPTQConfig, AWQConfig, Fp8Config, BitsAndBytesConfig, GGUFConfig):
        register_quantization(config.name, config.from_config)


_register_builtin()


def get_quantization_config(spec: QuantizationSpec | None) -> QuantizationConfig | None:
    if spec is None:
        return None
    if spec.method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization method {spec.method!r} is not supported; supported: "
                         f"{', '.join(sorted(QUANTIZATION_METHODS)) or 'none'}")
    return QUANTIZATION_METHODS[spec.method](spec.config)


def embedding_method(config: QuantizationConfig | None, prefix: str) -> Any:
    """The method of the vocab embedding / LM head named `prefix` (None: float rows)."""
    return config.get_embedding_method(prefix) if config is not None else None
