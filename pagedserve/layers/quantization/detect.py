"""Which quantization a model runs with: the checkpoint's `quantization_config` (config.json,
or quantize_config.json beside it for older GPTQ) and the user's `quantization=` (vLLM's
value names and aliases; TGI's QUANTIZE values map here too). A converted GGUF (models/
gguf_packed.py) carries gguf_quant.json: its blocks run as method "gguf". A conflict names both; an
unknown method lists the supported ones."""
from __future__ import annotations

import json
import os
from typing import Any

from pagedserve.config import QuantizationSpec

SUPPORTED = ("awq", "bitsandbytes", "compressed-tensors", "fp8", "gguf", "gptq")

# the names users pass (vLLM's --quantization, TGI's --quantize) -> our method
ALIASES = {
    "awq": "awq", "awq_marlin": "awq",
    "gptq": "gptq", "gptq_marlin": "gptq",
    "compressed-tensors": "compressed-tensors", "compressed_tensors": "compressed-tensors",
    "fp8": "fp8", "fp8-per-channel": "fp8",
    "bitsandbytes": "bitsandbytes", "bitsandbytes-8bit": "bitsandbytes",
    "gguf": "gguf",
}
# quantization files beside config.json -> the quant_method they imply when they name none
SIDE_FILES = {"quantize_config.json": "gptq", "quant_config.json": "awq", "gguf_quant.json": "gguf"}
# online (quantized at load from a float checkpoint): name -> the config it stands for
ONLINE = {
    "fp8": {"quant_method": "fp8", "online": True, "weight_strategy": "tensor"},
    "fp8-per-channel": {"quant_method": "fp8", "online": True, "weight_strategy": "channel"},
    "bitsandbytes": {"quant_method": "bitsandbytes", "online": True, "load_in_8bit": True},
    "bitsandbytes-8bit": {"quant_method": "bitsandbytes", "online": True, "load_in_8bit": True},
}


class QuantizationError(ValueError):
    """A quantization setting that cannot work; `param` is the setting to blame."""

    def __init__(self, message: str, param: str = "quantization") -> None:
        super().__init__(message)
        self.param = param


def supported_text() -> str:
    return (f"supported: {', '.join(SUPPORTED)} (aliases: {', '.join(sorted(set(ALIASES) - set(SUPPORTED)))}; "
            "online at load: fp8, fp8-per-channel, bitsandbytes)")


def canonical(name: str) -> str:
    key = name.strip().lower()
    if key not in ALIASES:
        raise QuantizationError(f"quantization method {name!r} is not supported; {supported_text()}")
    return ALIASES[key]


def checkpoint_quantization(directory: str) -> dict[str, Any] | None:
    """The checkpoint's quantization_config (config.json), else a SIDE_FILES file
    (quantize_config.json: GPTQ before transformers carried it; gguf_quant.json: the
    block types of a converted GGUF)."""
    try:
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f).get("quantization_config")
    except (OSError, ValueError):
        config = None
    if config:
        return dict(config)
    for name, method in SIDE_FILES.items():
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path) as f:
                config = json.load(f)
            config.setdefault("quant_method", method)
            return config
    return None


def resolve_quantization(requested: str | None, checkpoint: dict[str, Any] | None) -> QuantizationSpec | None:
    """The QuantizationSpec to run with (None: float weights)."""
    ckpt_method = None
    if checkpoint is not None:
        raw = str(checkpoint.get("quant_method", ""))
        try:
            ckpt_method = canonical(raw)
        except QuantizationError:
            raise QuantizationError(f"the checkpoint's quantization_config has quant_method {raw!r}, which is not "
                                    f"supported; {supported_text()}") from None
    if requested in (None, "", "none", "None"):
        return QuantizationSpec(ckpt_method, json.dumps(checkpoint, sort_keys=True)) if ckpt_method else None
    method = canonical(requested)
    if ckpt_method is not None:
        if method != ckpt_method and ckpt_method == "gguf":
            raise QuantizationError(f"quantization={requested!r} needs a {method} checkpoint, but the model is a "
                                    "GGUF file (its blocks run as quantization 'gguf'): leave quantization unset")
        if method != ckpt_method:
            raise QuantizationError(f"quantization={requested!r} conflicts with the checkpoint's quantization_config "
                                    f"(quant_method {checkpoint.get('quant_method')!r}): pass "
                                    f"quantization={ckpt_method!r} or leave it unset")
        return QuantizationSpec(ckpt_method, json.dumps(checkpoint, sort_keys=True))
    online = ONLINE.get(requested.strip().lower())
    if online is None:
        raise QuantizationError(f"quantization={requested!r} needs a {method} checkpoint, but the model has no "
                                "quantization_config; quantized at load are only fp8, fp8-per-channel and bitsandbytes")
    return QuantizationSpec(method, json.dumps(online, sort_keys=True))
