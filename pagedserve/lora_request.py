"""vLLM's LoRARequest: which adapter a request runs with (`vllm.lora.request.LoRARequest`)."""
from __future__ import annotations

from dataclasses import dataclass

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
