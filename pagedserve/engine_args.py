"""The flat set of user-facing engine knobs (shared by LLM(), the CLI and the server), turned
into one frozen EngineConfig. Unknown knobs, and knobs whose feature does not exist yet,
are rejected with a ValidationError naming them."""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

import torch

from pagedserve.config import (CacheConfig, architecture_of, DeviceConfig, EngineConfig, ModelConfig, ParallelConfig,
                               SchedulerConfig, resolve_dtype)
from pagedserve.errors import ValidationError
from pagedserve.models.loader import LOAD_FORMATS, ModelSource, load_hf_config, materialize_gguf, resolve_model
from pagedserve.models.registry import resolve_model_class

logger = logging.getLogger(__name__)

# vLLM knobs we accept only at their default, with why.
NOT_SUPPORTED = {
    "quantization": "quantization is not supported yet",
    "speculative_config": "speculative decoding is not supported yet",
    "pipeline_parallel_size": "pipeline parallelism is not supported",
    "enable_lora": "LoRA adapters are not supported yet",
    "kv_cache_dtype": "a KV cache dtype other than the model dtype is not supported yet",
}


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int | None = None   # None: 1024 on a large GPU, else 256 (default_max_num_seqs)
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    load_format: str = "auto"
    skip_tokenizer_init: bool = False
    device: str = "auto"
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    # Schedule step N+1 while step N runs on the device (None: on for CUDA with TP=1).
    async_scheduling: bool | None = None
    tensor_parallel_size: int = 1
    kv_cache_memory_gb: float | None = None
    num_kv_blocks: int | None = None
    scheduling_policy: str = "continuous"
    trust_remote_code: bool = False

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineArgs":
        known = {f.name for f in fields(cls)}
        for key, value in kwargs.items():
            if key in NOT_SUPPORTED:
                if value not in (None, False, 1, "auto"):
                    raise ValidationError(f"{key}={value!r}: {NOT_SUPPORTED[key]}", key)
            elif key not in known:
                raise ValidationError(f"unknown engine argument {key!r}", key)
        return cls(**{k: v for k, v in kwargs.items() if k in known})

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValidationError(f"block_size must be a power of two, got {self.block_size}", "block_size")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValidationError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}", "max_num_seqs")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValidationError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}",
                                  "gpu_memory_utilization")
        if self.tensor_parallel_size < 1:
            raise ValidationError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}",
                                  "tensor_parallel_size")
        if self.load_format not in LOAD_FORMATS:
            raise ValidationError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}",
                                  "load_format")
        if self.scheduling_policy not in ("continuous", "static"):
            raise ValidationError(f"scheduling_policy must be continuous or static, got {self.scheduling_policy!r}",
                                  "scheduling_policy")
        if self.trust_remote_code:
            raise ValidationError("trust_remote_code is not supported: only built-in architectures run",
                                  "trust_remote_code")

    def create_config(self) -> tuple[EngineConfig, Any, ModelSource]:
        """Resolve the model (offline), read its config once, check every cross-field rule."""
        self.validate()
        from pagedserve.worker.executor import resolve_device
        device = resolve_device(self.device)
        source = resolve_model(self.model)
        if source.gguf_file and self.load_format != "dummy":
            source = materialize_gguf(source)
        hf_config = load_hf_config(source)
        resolve_model_class(architecture_of(hf_config))
        dtype = resolve_dtype(self.dtype, getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None),
                              device.type)
        model_config = ModelConfig.from_hf(hf_config, dtype, self.max_model_len)
        max_model_len = model_config.max_model_len
        if self.max_model_len is None and max_model_len > model_config.max_position_embeddings:
            max_model_len = model_config.max_position_embeddings
        batched = self.max_num_batched_tokens
        if batched is None:
            batched = 8192 if device.type == "cuda" else 2048
        if batched < 1:
            raise ValidationError(f"max_num_batched_tokens must be >= 1, got {batched}", "max_num_batched_tokens")
        max_num_seqs = self.max_num_seqs or default_max_num_seqs(device)
        check_tensor_parallel(self.tensor_parallel_size, model_config, device.type)
        config = EngineConfig(
            model_path=source.directory, gguf_file=source.gguf_file, model=model_config,
            cache=CacheConfig(self.block_size, self.enable_prefix_caching, self.kv_cache_memory_gb,
                              self.num_kv_blocks, self.gpu_memory_utilization),
            scheduler=SchedulerConfig(max_num_seqs, batched, max_model_len, self.scheduling_policy),
            parallel=ParallelConfig(self.tensor_parallel_size),
            device=DeviceConfig(str(device), self.enforce_eager, self.seed,
                                self.async_scheduling if self.async_scheduling is not None
                                else device.type == "cuda" and self.tensor_parallel_size == 1),
            load_format=self.load_format)
        return config, hf_config, source


def default_max_num_seqs(device: torch.device) -> int:
    """vLLM's rule: 1024 concurrent sequences on GPUs with 70 GiB or more (A100 excepted),
    256 elsewhere. Big batches amortise each step's weight reads and host work; the sampler
    and CUDA graphs keep their memory bounded whatever this is (SAMPLER_CHUNK_ROWS,
    MAX_CAPTURE_SIZE)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        if props.total_memory >= 70 * 2**30 and "A100" not in props.name:
            return 1024
    return 256


def check_tensor_parallel(tp: int, model: ModelConfig, device_type: str) -> None:
    if tp == 1:
        return
    import torch
    from pagedserve.worker.tp_executor import external_rendezvous
    if device_type == "cuda" and tp > torch.cuda.device_count() and not external_rendezvous():
        raise ValidationError(f"tensor_parallel_size={tp} is larger than the {torch.cuda.device_count()} "
                              "GPUs present", "tensor_parallel_size")
    for value, what in ((model.num_heads, "num_attention_heads"), (model.vocab_size, "vocab_size"),
                        (model.intermediate_size, "intermediate_size")):
        if value % tp:
            raise ValidationError(f"{what} ({value}) is not divisible by tensor_parallel_size ({tp})",
                                  "tensor_parallel_size")
    kv = model.num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ValidationError(f"num_key_value_heads ({kv}) and tensor_parallel_size ({tp}) must divide one another",
                              "tensor_parallel_size")
