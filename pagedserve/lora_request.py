"""vLLM's LoRARequest: which adapter a request runs with (`vllm.lora.request.LoRARequest`); and
LoadedLoRA, an adapter's factors as read once when it is registered (frontend/lora_registry.py),
on their way to every rank's host cache (EngineCore.add_lora)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedserve.errors import ValidationError


@dataclass(frozen=True)
class LoRARequest:
    """lora_name: what the server calls it (a `model` name); lora_int_id: its id, >= 1, one per
    adapter (the KV prefix cache and the device slots key on it); lora_path: a PEFT adapter
    folder (adapter_config.json, adapter_model.safetensors)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValidationError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}", "lora_request")
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValidationError("lora_name must be a non-empty string", "lora_request")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValidationError("lora_path must be a non-empty string", "lora_request")


@dataclass(frozen=True)
class LoadedLoRA:
    """An adapter read and checked against the model (models/lora_adapter.load_adapter): its
    factors on the host, module name (model.layers.N.self_attn.q_proj) -> (A [r, in], B * scaling
    [out, r]), CPU tensors in the model's dtype, whole (each rank takes its part when it copies
    them into a device slot)."""

    lora_request: LoRARequest
    factors: dict[str, tuple[Any, Any]]

    @property
    def lora_int_id(self) -> int:
        return self.lora_request.lora_int_id
