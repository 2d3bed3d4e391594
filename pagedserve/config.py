"""One frozen EngineConfig made of parts; each component receives only the part it uses.

ModelConfig.from_hf converts a Hugging Face config ONCE; none travels to the worker (the loader
re-reads a GGUF file's own config only when it dequantizes that file directly).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from pagedserve.errors import ValidationError

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


@dataclass(frozen=True)
class QuantizationSpec:
    """How the weights are quantized: the canonical method name (layers/quantization) and
    the checkpoint's quantization_config as JSON text ("{}" when quantized at load)."""

    method: str
    config_json: str = "{}"

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    hidden_act: str
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    dtype: torch.dtype
    max_model_len: int
    sliding_window: int | None = None
    quantization: QuantizationSpec | None = None   # None: float weights
    # mixture of experts (Mixtral, Qwen3-MoE; layers/moe.py): the sparse layers' indices, their
    # experts, each token's top_k of them, the experts' intermediate size, top-k renormalised
    moe_layers: tuple[int, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0   # Qwen2-MoE: a dense expert every token takes, gated

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @staticmethod
    def from_hf(hf_config: Any, dtype: torch.dtype, max_model_len: int | None) -> "ModelConfig":
        arch = architecture_of(hf_config)
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        rope_scaling = _rope_scaling(hf_config)
        rope_theta = _rope_theta(hf_config)
        max_pos = getattr(hf_config, "max_position_embeddings", None) or 2048
        if max_model_len is None:
            max_model_len = max_pos
        elif max_model_len < 1:
            raise ValidationError(f"max_model_len must be >= 1, got {max_model_len}", "max_model_len")
        sliding = getattr(hf_config, "sliding_window", None)
        if getattr(hf_config, "use_sliding_window", True) is False:
            sliding = None
        if sliding is not None and max_model_len > sliding:
            raise ValidationError(
                f"max_model_len={max_model_len} exceeds the model's sliding_window={sliding}; "
                f"sliding-window attention is not supported yet: set max_model_len <= {sliding}",
                "max_model_len")
        return ModelConfig(
            architecture=arch,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=getattr(hf_config, "rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf_config, "attention_bias", False))
            or arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM"),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            hidden_act=getattr(hf_config, "hidden_act", "silu"),
            eos_token_ids=eos_ids,
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            dtype=dtype,
            max_model_len=max_model_len,
            sliding_window=sliding,
            **_moe_fields(hf_config, arch),
        )

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None


def _moe_fields(hf_config: Any, arch: str) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields: Mixtral's every layer (top-k renormalised),
    Qwen2-MoE's and Qwen3-MoE's layers by decoder_sparse_step and mlp_only_layers
    (norm_topk_prob; Qwen2-MoE's gated shared expert)."""
    if arch == "MixtralForCausalLM":
        return dict(moe_layers=tuple(range(hf_config.num_hidden_layers)), num_experts=hf_config.num_local_experts,
                    num_experts_per_tok=hf_config.num_experts_per_tok,
                    moe_intermediate_size=hf_config.intermediate_size, norm_topk_prob=True)
    if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        step = getattr(hf_config, "decoder_sparse_step", 1) or 1
        dense = set(getattr(hf_config, "mlp_only_layers", ()) or ())
        layers = tuple(i for i in range(hf_config.num_hidden_layers)
                       if hf_config.num_experts > 0 and i not in dense and (i + 1) % step == 0)
        return dict(moe_layers=layers, num_experts=hf_config.num_experts,
                    num_experts_per_tok=hf_config.num_experts_per_tok,
                    moe_intermediate_size=hf_config.moe_intermediate_size,
                    norm_topk_prob=bool(getattr(hf_config, "norm_topk_prob", False)),
                    shared_expert_intermediate_size=getattr(hf_config, "shared_expert_intermediate_size", 0) or 0)
    return {}


def architecture_of(hf_config: Any) -> str:
    """The HF architecture name; GGUF-derived configs may only carry a model_type."""
    archs = getattr(hf_config, "architectures", None) or []
    if archs:
        return archs[0]
    model_type = getattr(hf_config, "model_type", "")
    return _ARCH_BY_MODEL_TYPE.get(model_type, model_type)


_ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM",
                       "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                       "qwen2_moe": "Qwen2MoeForCausalLM"}


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    """transformers 5 keeps rope settings in `rope_parameters`; 4.x in rope_theta/rope_scaling."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_type" in params or isinstance(params, dict) and "rope_theta" in params:
        return dict(params)
    return {}


def _rope_theta(hf_config: Any) -> float:
    params = _rope_parameters(hf_config)
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(hf_config, "rope_theta", 10000.0))


def _rope_scaling(hf_config: Any) -> dict[str, Any] | None:
    params = _rope_parameters(hf_config) or dict(getattr(hf_config, "rope_scaling", None) or {})
    params.pop("rope_theta", None)
    partial = params.pop("partial_rotary_factor", None) or getattr(hf_config, "partial_rotary_factor", None)
    if partial not in (None, 1, 1.0):   # Phi-4-mini, StableLM: rotary on part of each head
        raise ValidationError(f"partial_rotary_factor {partial} is not supported (rotary over whole heads only)",
                              "rope_scaling")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type not in ("llama3", "linear", "yarn"):
        raise ValidationError(f"rope_scaling type {rope_type!r} is not supported (supported: llama3, linear, yarn)",
                              "rope_scaling")
    params["rope_type"] = rope_type
    params.pop("type", None)
    if rope_type == "yarn" and params.get("factor") is None:   # transformers' default: the positions' ratio
        max_pos = getattr(hf_config, "max_position_embeddings", None)
        if max_pos and params.get("original_max_position_embeddings"):
            params["factor"] = max_pos / params["original_max_position_embeddings"]
    return params


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory_gb: float | None = None   # CPU: explicit KV budget
    num_kv_blocks: int | None = None          # explicit override (tests, benchmarks)
    gpu_memory_utilization: float = 0.9
    # The host tier (pinned on CUDA): GiB for swapped-out requests and evicted prefix blocks;
    # kv_offloading_size, when set, sizes it instead of swap_space. 0: no host tier.
    swap_space: float = 4.0
    kv_offloading_size: float | None = None
    cache_dtype: str = "auto"   # vLLM's kv_cache_dtype: "auto" (the model's) or an FP8 format (KV_CACHE_DTYPES)


# kv_cache_dtype names (vLLM's, and TGI's --kv-cache-dtype fp8_e4m3fn) -> the KV cache's element type
# (None: the model's dtype). FP8 caches store K and V at a scale of 1.0 (vLLM's default without
# calibrated scales), saturating at the format's largest finite value; attention reads them back
# into the model's dtype.
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                   "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def kv_cache_torch_dtype(cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    return KV_CACHE_DTYPES[cache_dtype] or model_dtype


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters (vLLM's enable_lora): `max_loras` of them on the device at once (the ones a
    step can mix: core/lora_slots.py), each of rank <= max_lora_rank; `max_cpu_loras` of them are
    kept read on the host (frontend/lora_registry.py: more while more are in use)."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int = 1


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    policy: str = "continuous"   # "continuous" | "priority" | "static" (core/scheduler.py)
    preemption_mode: str = "swap"   # "swap" (to the host tier when it has room, else recompute) | "recompute"
    lora: LoRAConfig | None = None   # None: no adapters
    num_scheduler_steps: int = 1   # decode steps one schedule may run (core/decode_window.py)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    # How ranks 1..N-1 join: "spawn" (rank 0 starts them on this machine), "env" (started by
    # hand, torch.distributed's env:// rendezvous; rank 0 had MASTER_ADDR and WORLD_SIZE set)
    # or "ray" (Ray actors on a Ray cluster, distributed_executor_backend="ray").
    distributed_init: str = "spawn"
    # Stages of consecutive layers; world = tensor_parallel_size x pipeline_parallel_size,
    # rank = pp_rank * tensor_parallel_size + tp_rank (layers/parallel.py).
    pipeline_parallel_size: int = 1
    # All-reduces of tensors up to this many bytes through torch's symmetric memory (one-shot
    # over NVLink peer memory, layers/custom_all_reduce.py) instead of NCCL; 0: off
    # (disable_custom_all_reduce). PAGEDSERVE_CUSTOM_ALL_REDUCE_MAX_KB at start-up.
    custom_all_reduce_bytes: int = 1 << 20
    # Its kernel: "one_shot" (torch's) or "push" (two ranks: layers/triton_all_reduce.py);
    # PAGEDSERVE_CUSTOM_ALL_REDUCE_KIND at start-up (default: push at TP=2, with 4 MiB).
    custom_all_reduce_kind: str = "one_shot"
    # How step messages reach ranks on this machine: "shm" (worker/shm_queue.py) or "broadcast"
    # (the step group's collective); PAGEDSERVE_TP_STEP_QUEUE at start-up. Ranks started by hand
    # (distributed_init "env") always use "broadcast".
    step_queue: str = "shm"

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "cpu"
    enforce_eager: bool = False
    seed: int = 0
    async_scheduling: bool = False
    # Decode batches of at most this many rows use the Triton gemv on CUDA where it beats
    # cuBLAS, and the decode fusions (0: off); PAGEDSERVE_GEMV_MAX_ROWS at start-up, see
    # layers/linear_ops.py (64 since the H200 row-bucket sweep of 2026-12-03; 16 before).
    gemv_max_rows: int = 64
    # Piecewise CUDA graphs for mixed steps (worker/mixed_graphs.py; CUDA, unless enforce_eager);
    # PAGEDSERVE_MIXED_GRAPHS=0 at start-up turns them off.
    mixed_graphs: bool = True
    # Cascade attention for decode rows that share a cached prefix (CUDA; EngineArgs.disable_cascade_attn)
    cascade_attn: bool = True


def shares_sampled_ids(async_scheduling: bool, tensor_parallel_size: int, pipeline_parallel_size: int) -> bool:
    """Async TP without PP: rank 0 broadcasts each step's sampled ids on the device and every
    rank feeds them to its next step itself (model_runner.share_sampled), so every rank can run
    a decode window's steps (EngineCore's gate). Lockstep TP workers learn a step's tokens only
    from the next SchedulerOutput; under PP the last stage sends its output back to rank 0."""
    return async_scheduling and tensor_parallel_size > 1 and pipeline_parallel_size == 1


@dataclass(frozen=True)
class WeightSource:
    """Where the worker reads the weights: a folder, the GGUF file inside it if that is the
    format, the load format, and the seed of "dummy" (random) weights."""

    directory: str
    gguf_file: str | None = None
    load_format: str = "auto"
    seed: int = 0


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    weights: WeightSource
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


def resolve_dtype(dtype: str | torch.dtype, config_dtype: Any, device: str) -> torch.dtype:
    """"auto" is float32 on CPU and the checkpoint's dtype (fp16/bf16) on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device == "cpu":
            return torch.float32
        if isinstance(config_dtype, torch.dtype) and config_dtype in (torch.float16, torch.bfloat16):
            return config_dtype
        if isinstance(config_dtype, str) and config_dtype in ("float16", "bfloat16"):
            return _DTYPES[config_dtype]
        return torch.bfloat16
    if dtype not in _DTYPES:
        raise ValidationError(f"dtype must be one of auto, float32, bfloat16, float16; got {dtype!r}", "dtype")
    return _DTYPES[dtype]
