"""The flat set of user-facing engine knobs (shared by LLM(), the CLI and the server), turned
into one frozen EngineConfig. Unknown knobs, and knobs whose feature does not exist yet,
are rejected with a ValidationError naming them."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from pagedserve.config import (KV_CACHE_DTYPES, CacheConfig, architecture_of, DeviceConfig, EngineConfig, LoRAConfig, ModelConfig,
                               ParallelConfig, SchedulerConfig, WeightSource, resolve_dtype)
from pagedserve.errors import ValidationError
from pagedserve.layers.quantization import get_quantization_config
from pagedserve.layers.quantization.detect import QuantizationError, checkpoint_quantization, resolve_quantization
from pagedserve.models.loader import LOAD_FORMATS, ModelSource, load_hf_config, materialize_gguf, resolve_model
from pagedserve.models.registry import resolve_model_class
from pagedserve.worker.kv_budget import resolve_device

logger = logging.getLogger(__name__)

# vLLM knobs we accept only at their default, with why.
NOT_SUPPORTED = {
    "speculative_config": "speculative decoding is not supported yet",
}


SCHEDULING_POLICIES = ("continuous", "fcfs", "priority", "static")


def _knob(default: Any, help: str, **cli: Any) -> Any:
    """An EngineArgs field: its default and its help text (the CLI flags are generated from
    the fields: `--max-model-len` from max_model_len; `cli` may add aliases or choices)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class EngineArgs:
    """The engine knobs, the one list of them: LLM(**kwargs) takes exactly these (see
    from_kwargs) and `pagedserve serve` / `generate` generate their flags from them
    (server/engine_flags.py)."""

    model: str | None = _knob(None, "model folder, .gguf file or org/name in the local HF cache "
                                    "(default: the embedded SmolLM2-135M-Instruct)")
    tokenizer: str | None = _knob(None, "tokenizer folder or name (default: the model's)")
    dtype: str = _knob("auto", "auto (float32 on CPU, the checkpoint's float16/bfloat16 on GPU), float16, "
                               "bfloat16 or float32")
    max_model_len: int | None = _knob(None, "longest prompt + output in tokens (default: the model's context "
                                            "length)")
    block_size: int = _knob(16, "tokens per KV cache block (a power of two)")
    max_num_seqs: int | None = _knob(None, "most sequences in one step (default: 1024 on GPUs with 70 GiB or "
                                           "more, else 256, as vLLM)")
    max_num_batched_tokens: int | None = _knob(None, "most tokens in one step (default: 8192 on CUDA, 16384 for "
                                                     "the offline LLM on GPUs with 70 GiB or more, as vLLM; "
                                                     "on CPU 512, 1024 for the offline LLM)")
    num_scheduler_steps: int | None = _knob(None, "decode steps one schedule runs while every running request "
                                                  "decodes and nothing waiting could join (vLLM V0's multi-step "
                                                  "scheduling: the host's work a token shrinks, tokens arrive that "
                                                  "many at a time; not under PP, and under TP only with async "
                                                  "scheduling; default: 4 for the offline LLM on one CUDA GPU, "
                                                  "else 1)")
    enable_prefix_caching: bool = _knob(True, "reuse the KV cache blocks of shared prompt prefixes")
    seed: int = _knob(0, "random seed of the engine (dummy weights, and sampling without a request seed)")
    load_format: str = _knob("auto", "auto, safetensors, pt, gguf or dummy (random weights)")
    skip_tokenizer_init: bool = _knob(False, "load no tokenizer: prompts are token ids, outputs are not "
                                             "detokenized")
    device: str = _knob("auto", "auto, cpu, cuda or cuda:N")
    gpu_memory_utilization: float = _knob(0.9, "share of the GPU memory for weights, activations and KV cache")
    enforce_eager: bool = _knob(False, "run eagerly: no CUDA graphs")
    disable_cascade_attn: bool = _knob(False, "CUDA: decode rows that share a cached prefix read it each "
                                              "for itself, not once for them all (cascade attention: the same "
                                              "results up to the sums' rounding order; vLLM's flag)")
    async_scheduling: bool | None = _knob(None, "schedule the next step while the current one runs "
                                                "(default: on for CUDA, and with pipeline_parallel_size > 1)")
    tensor_parallel_size: int = _knob(1, "number of GPUs to shard the model over", aliases=("-tp",))
    disable_custom_all_reduce: bool = _knob(False, "tensor parallelism: every all-reduce through NCCL (no "
                                                   "custom all-reduce over NVLink peer memory for small tensors)")
    kv_cache_memory_gb: float | None = _knob(None, "KV cache size on CPU, in GB")
    num_kv_blocks: int | None = _knob(None, "number of KV cache blocks (instead of sizing them from memory)")
    scheduling_policy: str = _knob("continuous", "continuous (requests join and leave the batch every step, first "
                                                 "come first served; vLLM's fcfs is the same), priority (continuous, "
                                                 "lower request priority first, vLLM's priority) or static (one "
                                                 "batch at a time)", choices=SCHEDULING_POLICIES)
    trust_remote_code: bool = _knob(False, "not supported: only built-in architectures run")
    max_logprobs: int = _knob(20, "most logprobs and prompt_logprobs a request may ask for (-1: no cap; a "
                                  "request's -1 means the whole vocabulary and needs a cap at least that large)")
    allow_long_max_model_len: bool = _knob(False, "allow a max_model_len beyond the model's max_position_embeddings "
                                                  "(and its rope scaling's range); outputs past it may be garbage "
                                                  "(vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN)")
    pipeline_parallel_size: int = _knob(1, "number of pipeline stages (consecutive layers each) over ranks; "
                                           "world = tensor_parallel_size x this", aliases=("-pp",))
    distributed_executor_backend: str = _knob("mp", "how ranks 1..N-1 start: mp (processes on this machine) or ray "
                                                    "(Ray actors placed on the Ray cluster: RAY_ADDRESS or `ray "
                                                    "start` here, else a local Ray)", choices=("mp", "ray"))
    swap_space: float = _knob(4.0, "host memory for the KV cache's host tier, in GiB (pinned on CUDA; per "
                                   "rank under TP): preempted requests are swapped there instead of "
                                   "recomputed, and evicted prefix-cache blocks are kept there; 0 turns it off")
    kv_offloading_size: float | None = _knob(None, "size of the host tier in GiB, instead of swap_space (vLLM V1's "
                                                   "name for the CPU tier of the prefix cache; one pool serves both)")
    kv_cache_dtype: str = _knob("auto", "the KV cache's element type: auto (the model's dtype) or fp8 / fp8_e4m3 "
                                        "(TGI: fp8_e4m3fn) / fp8_e5m2 (one byte a value, twice the tokens in the "
                                        "same memory; stored at scale 1.0, read back into the model's dtype)",
                                choices=tuple(KV_CACHE_DTYPES))
    preemption_mode: str | None = _knob(None, "swap (to the host tier while it has room, else recompute) or "
                                              "recompute (default: swap when the host tier exists)",
                                        choices=("swap", "recompute"))
    runner: str = _knob("auto", "auto (an embedding model's folder, a sentence-transformers BertModel or a "
                                "decoder's backbone such as MistralModel, is served for embeddings, anything else "
                                "generates), generate or pooling (also a generative decoder as an embedding model: "
                                "Qwen3-Embedding): vLLM's --runner, checked against the model",
                        choices=("auto", "generate", "pooling"))
    task: str = _knob("auto", "vLLM's older name for runner: auto, generate, embed (or embedding)",
                      choices=("auto", "generate", "embed", "embedding"))
    quantization: str | None = _knob(None, "quantization method (vLLM's names): compressed-tensors, gptq, awq, fp8, "
                                           "bitsandbytes (default: the checkpoint's quantization_config); fp8, "
                                           "fp8-per-channel and bitsandbytes also quantize a float checkpoint at "
                                           "load", aliases=("-q",))
    hf_overrides: str | None = _knob(None, "a JSON object (offline also a dict) of Hugging Face config fields to "
                                           "override, as vLLM's (e.g. YaRN: '{\"rope_scaling\": {\"rope_type\": "
                                           "\"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": "
                                           "32768}}')")
    enable_lora: bool = _knob(False, "serve LoRA adapters (PEFT folders): requests name one (LoRARequest, or the "
                                     "server's --lora-modules by model name)")
    max_loras: int = _knob(1, "LoRA adapters one step can mix (their device slots)")
    max_lora_rank: int = _knob(16, "the largest LoRA rank an adapter may have")
    max_cpu_loras: int | None = _knob(None, "LoRA adapters kept read on the host, least recently used dropped "
                                            "first unless a request runs it (default: max_loras)")
    grammar_compile_timeout: float = _knob(20.0, "server: seconds a request's structured-outputs grammar may take "
                                                 "to compile (in a child process) before the compile is stopped and "
                                                 "the request gets a 400 naming its field; waiting for a free compile "
                                                 "process is bounded by twice this (then 503); the offline LLM "
                                                 "compiles in-process, unbounded")

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
        if not isinstance(self.pipeline_parallel_size, int) or self.pipeline_parallel_size < 1:
            raise ValidationError(f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}",
                                  "pipeline_parallel_size")
        if self.distributed_executor_backend not in ("mp", "ray"):
            raise ValidationError(f"distributed_executor_backend must be mp or ray, got "
                                  f"{self.distributed_executor_backend!r}", "distributed_executor_backend")
        if self.load_format not in LOAD_FORMATS:
            raise ValidationError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}",
                                  "load_format")
        if self.runner not in ("auto", "generate", "pooling"):
            raise ValidationError(f"runner must be auto, generate or pooling, got {self.runner!r}", "runner")
        if self.task not in ("auto", "generate", "embed", "embedding"):
            raise ValidationError(f"task must be auto, generate, embed or embedding, got {self.task!r}", "task")
        if {self.runner, self.task} in ({"pooling", "generate"}, {"generate", "embed"}, {"generate", "embedding"}):
            raise ValidationError(f"runner={self.runner!r} and task={self.task!r} disagree", "task")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValidationError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got "
                                  f"{self.scheduling_policy!r}",
                                  "scheduling_policy")
        steps = self.num_scheduler_steps
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 64):
            raise ValidationError(f"num_scheduler_steps must be an integer from 1 to 64, got {steps!r}",
                                  "num_scheduler_steps")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise ValidationError(f"max_logprobs must be -1 (no cap) or >= 0, got {self.max_logprobs}", "max_logprobs")
        if not self.grammar_compile_timeout > 0:
            raise ValidationError(f"grammar_compile_timeout must be > 0 seconds, got {self.grammar_compile_timeout}",
                                  "grammar_compile_timeout")
        for name in ("swap_space", "kv_offloading_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not 0 <= value < float("inf")):
                raise ValidationError(f"{name} must be a number of GiB >= 0, got {value!r}", name)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValidationError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                                  f"{self.kv_cache_dtype!r}", "kv_cache_dtype")
        if self.preemption_mode not in (None, "swap", "recompute"):
            raise ValidationError(f"preemption_mode must be swap or recompute, got {self.preemption_mode!r}",
                                  "preemption_mode")
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValidationError(f"{name} must be an integer >= 1, got {value!r}", name)
        if self.max_cpu_loras is not None and isinstance(self.max_loras, int) and self.max_cpu_loras < self.max_loras:
            raise ValidationError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})",
                                  "max_cpu_loras")   # vLLM's rule
        if self.trust_remote_code:
            raise ValidationError("trust_remote_code is not supported: only built-in architectures run",
                                  "trust_remote_code")

    def create_config(self, offline: bool = False) -> tuple[EngineConfig, Any, ModelSource]:
        """Resolve the model (offline), read its config once, check every cross-field rule.
        The environment is read here, once: PAGEDSERVE_GEMV_MAX_ROWS, PAGEDSERVE_MIXED_GRAPHS, PAGEDSERVE_TP_STEP_QUEUE,
        PAGEDSERVE_CUSTOM_ALL_REDUCE_MAX_KB / _KIND, and MASTER_ADDR /
        WORLD_SIZE / RANK (tensor-parallel ranks started by hand, env:// rendezvous)."""
        self.validate()
        device = resolve_device(self.device)
        source = resolve_model(self.model)
        distributed_init = "env" if "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ else "spawn"
        if self.distributed_executor_backend == "ray":
            if distributed_init == "env":
                raise ValidationError("distributed_executor_backend='ray' places the ranks itself: unset MASTER_ADDR "
                                      "and WORLD_SIZE (the env:// rendezvous)", "distributed_executor_backend")
            distributed_init = "ray"
        if source.gguf_file and self.load_format != "dummy":
            def check_split(hf_config: Any) -> None:   # from the file's metadata, before the long conversion
                early = ModelConfig.from_hf(hf_config, torch.float32, self.max_model_len)
                check_tensor_parallel(self.tensor_parallel_size, early, device.type, distributed_init,
                                      self.pipeline_parallel_size)
            source = materialize_gguf(source, check_split if self.tensor_parallel_size * self.pipeline_parallel_size > 1
                                      else None)
        hf_config = apply_hf_overrides(load_hf_config(source), self.hf_overrides)
        resolve_model_class(architecture_of(hf_config))
        dtype = resolve_dtype(self.dtype, getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None),
                              device.type)
        model_config = ModelConfig.from_hf(hf_config, dtype, self.max_model_len)
        model_config = dataclasses.replace(model_config, quantization=self._quantization(source))
        check_tensor_parallel(self.tensor_parallel_size, model_config, device.type, distributed_init,
                              self.pipeline_parallel_size)
        check_max_model_len(self.max_model_len, model_config, self.allow_long_max_model_len)
        max_model_len = model_config.max_model_len
        if self.max_model_len is None and max_model_len > model_config.max_position_embeddings:
            max_model_len = model_config.max_position_embeddings
        batched = self.max_num_batched_tokens
        if batched is None:
            batched = default_max_num_batched_tokens(device, offline)
        if batched < 1:
            raise ValidationError(f"max_num_batched_tokens must be >= 1, got {batched}", "max_num_batched_tokens")
        max_num_seqs = self.max_num_seqs or default_max_num_seqs(device)
        # push is written for two ranks: asked for at more, the one-shot op with the one-shot's size
        one_shot = _choice("PAGEDSERVE_CUSTOM_ALL_REDUCE_KIND", "push" if self.tensor_parallel_size == 2 else "one_shot",
                           ("one_shot", "push")) == "one_shot" or self.tensor_parallel_size != 2
        config = EngineConfig(
            model=model_config,
            weights=WeightSource(source.directory, source.gguf_file, self.load_format, self.seed),
            cache=CacheConfig(self.block_size, self.enable_prefix_caching, self.kv_cache_memory_gb,
                              self.num_kv_blocks, self.gpu_memory_utilization, float(self.swap_space),
                              self.kv_offloading_size, self.kv_cache_dtype),
            scheduler=SchedulerConfig(max_num_seqs, batched, max_model_len,
                                      "continuous" if self.scheduling_policy == "fcfs" else self.scheduling_policy,
                                      self.preemption_mode or "swap",
                                      LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras or self.max_loras)
                                      if self.enable_lora else None,
                                      self.num_scheduler_steps or default_num_scheduler_steps(
                                          device, offline, self.tensor_parallel_size * self.pipeline_parallel_size)),
            # TP=2: the push all-reduce up to 4 MiB (llama-8b decode steps of up to 512 rows); other
            # sizes: torch's one-shot up to 1 MiB (benchmarks/RESULTS.md, issue 17)
            parallel=ParallelConfig(
                tensor_parallel_size=self.tensor_parallel_size, distributed_init=distributed_init,
                pipeline_parallel_size=self.pipeline_parallel_size,
                custom_all_reduce_bytes=0 if self.disable_custom_all_reduce
                else int(os.environ.get("PAGEDSERVE_CUSTOM_ALL_REDUCE_MAX_KB", "1024" if one_shot else "4096")) << 10,
                custom_all_reduce_kind="one_shot" if one_shot else "push",
                step_queue=_choice("PAGEDSERVE_TP_STEP_QUEUE", "shm", ("shm", "broadcast"))),
            # mixture-of-experts layers sync with the host per layer (layers/moe.py): no CUDA graphs
            device=DeviceConfig(str(device), self.enforce_eager or model_config.is_moe, self.seed,
                                self.async_scheduling if self.async_scheduling is not None
                                else device.type == "cuda" or self.pipeline_parallel_size > 1,
                                int(os.environ.get("PAGEDSERVE_GEMV_MAX_ROWS", "64")),
                                os.environ.get("PAGEDSERVE_MIXED_GRAPHS", "1") != "0",
                                cascade_attn=not self.disable_cascade_attn))
        return config, hf_config, source

    def _quantization(self, source: ModelSource):
        """The checkpoint's quantization_config and `quantization`, reconciled and checked
        (the config's schemes are parsed here, so a bad one fails before any weight loads)."""
        checkpoint = None if source.gguf_file else checkpoint_quantization(source.directory)
        try:
            spec = resolve_quantization(self.quantization, checkpoint)
            if spec is not None and spec.method == "gguf" and self.dtype in ("float32", "float", torch.float32):
                # asked for fp32 arithmetic: the blocks are dequantized at load (exact results)
                spec = dataclasses.replace(spec, config_json=json.dumps({**spec.config, "dequantize": True}))
            get_quantization_config(spec)
        except QuantizationError as exc:
            raise ValidationError(str(exc), exc.param) from None
        except ValueError as exc:
            raise ValidationError(f"unsupported quantization_config in {source.directory}: {exc}",
                                  "quantization") from None
        return spec


def _choice(variable: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(variable, default)
    if value not in choices:
        raise ValidationError(f"{variable} must be {' or '.join(choices)}, got {value!r}", variable)
    return value


def _big_gpu(device: torch.device) -> bool:
    """vLLM's line for its larger defaults: a GPU with 70 GiB or more, A100 excepted."""
    if device.type != "cuda":
        return False
    props = torch.cuda.get_device_properties(device)
    return props.total_memory >= 70 * 2**30 and "A100" not in props.name


def default_max_num_seqs(device: torch.device) -> int:
    """vLLM's rule: 1024 concurrent sequences on GPUs with 70 GiB or more (A100 excepted),
    256 elsewhere. Big batches amortise each step's weight reads and host work; the sampler
    and CUDA graphs keep their memory bounded whatever this is (SAMPLER_CHUNK_ROWS,
    MAX_CAPTURE_SIZE)."""
    return 1024 if _big_gpu(device) else 256


def default_max_num_batched_tokens(device: torch.device, offline: bool) -> int:
    """Tokens a step: 8192 on CUDA; the offline LLM takes vLLM's LLM-class budget of 16384 on
    GPUs with 70 GiB or more (A100 excepted), where half as many prefill steps start every
    prompt's decode sooner (benchmarks/RESULTS.md, session 33). The server keeps 8192 (vLLM's
    API-server default there too): a step's length is every running stream's inter-token
    latency. CPU: 1024 offline, 512 for the server; a 2-core CPU prefills faster in those
    chunks than in 2048-token ones (7,800 tokens: 35.2 -> 28.8-29.5 s at 1024), and the
    server's streams wait one 512-token step, not one 2048-token step, while a long prompt
    is prefilled (RESULTS.md, session 57)."""
    if device.type != "cuda":
        return 1024 if offline else 512
    return 16384 if offline and _big_gpu(device) else 8192


def default_num_scheduler_steps(device: torch.device, offline: bool, world_size: int = 1) -> int:
    """Decode windows of 4 steps for the offline LLM on one CUDA GPU: its host then never bounds a decode
    phase (thr512 llama-1b on an H100 whose engine had half a core: 29.1-30.4k -> 40.7-41.2k out
    tok/s, b1_decode 449-464 -> 762 tok/s; level on a fast host, benchmarks/RESULTS.md session 49).
    The server keeps 1: a request that arrives during a window waits for its end, and streams
    would get their tokens K at a time. CPU: 1 (its steps are the model's compute). Several ranks:
    1 (windows under async TP are tested on the CPU's gloo ranks, not yet measured on GPUs)."""
    return 4 if offline and device.type == "cuda" and world_size == 1 else 1


def apply_hf_overrides(hf_config: Any, overrides: str | dict | None) -> Any:
    """hf_overrides (a dict, or its JSON) set on the model's config; a `rope_scaling` override also
    replaces transformers 5's `rope_parameters` (which ModelConfig reads first), keeping its theta."""
    if overrides is None:
        return hf_config
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except ValueError as exc:
            raise ValidationError(f"hf_overrides is not JSON: {exc}", "hf_overrides") from None
    if not isinstance(overrides, dict):
        raise ValidationError("hf_overrides must be a JSON object of config fields", "hf_overrides")
    old = getattr(hf_config, "rope_parameters", None)
    theta = old.get("rope_theta") if isinstance(old, dict) else None
    theta = theta if theta is not None else getattr(hf_config, "rope_theta", None)
    rope = overrides.get("rope_scaling")
    for key, value in overrides.items():
        if key == "rope_scaling" and isinstance(old, dict):
            continue   # transformers 5 keeps it in rope_parameters (set below; its rope_scaling setter is deprecated)
        setattr(hf_config, key, value)
    if isinstance(rope, dict) and "rope_parameters" not in overrides:
        hf_config.rope_parameters = {**({"rope_theta": theta} if theta is not None else {}), **rope}
        params = hf_config.rope_parameters   # transformers' setter may fill the theta from its own (None)
        if isinstance(params, dict) and params.get("rope_theta") is None and theta is not None:
            params["rope_theta"] = theta
    return hf_config


def derived_max_len(model: ModelConfig) -> int:
    """The longest context the model's positions cover: max_position_embeddings, times the
    rope scaling factor for the scalings that extend it (llama3, longrope and dynamic ones
    already count it in max_position_embeddings, as in vLLM)."""
    derived = model.max_position_embeddings
    scaling = model.rope_scaling_dict or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = scaling.get("factor")
    if kind not in (None, "default", "llama3", "longrope", "su", "dynamic") and isinstance(factor, (int, float)):
        derived = int(derived * factor)
    return derived


def check_max_model_len(requested: int | None, model: ModelConfig, allow_long: bool) -> None:
    derived = derived_max_len(model)
    if requested is None or requested <= derived:
        return
    if allow_long:
        logger.warning("max_model_len=%d exceeds the model's %d positions (allow_long_max_model_len): outputs past "
                       "them may be wrong", requested, derived)
        return
    raise ValidationError(
        f"max_model_len={requested} is larger than the model's max_position_embeddings={model.max_position_embeddings}"
        + (f" (rope scaling covers {derived})" if derived != model.max_position_embeddings else "")
        + "; lower max_model_len, or set allow_long_max_model_len to accept it", "max_model_len")


def check_tensor_parallel(tp: int, model: ModelConfig, device_type: str, distributed_init: str = "spawn",
                          pp: int = 1) -> None:
    if tp * pp == 1:
        return
    if pp > model.num_layers:
        raise ValidationError(f"pipeline_parallel_size ({pp}) is larger than the model's {model.num_layers} layers",
                              "pipeline_parallel_size")
    if distributed_init == "env":
        world, rank = int(os.environ["WORLD_SIZE"]), os.environ.get("RANK", "0")
        if world != tp * pp or int(rank) != 0:
            raise ValidationError(f"env:// rendezvous: this process must be RANK=0 of WORLD_SIZE={tp * pp} "
                                  f"(tensor_parallel_size x pipeline_parallel_size), got "
                                  f"RANK={os.environ.get('RANK')} WORLD_SIZE={world}", "tensor_parallel_size")
    elif distributed_init == "spawn" and device_type == "cuda" and tp * pp > torch.cuda.device_count():
        raise ValidationError(f"tensor_parallel_size x pipeline_parallel_size = {tp * pp} is larger than the "
                              f"{torch.cuda.device_count()} GPUs present", "tensor_parallel_size")
    if tp == 1:
        return
    for value, what in ((model.num_heads, "num_attention_heads"), (model.vocab_size, "vocab_size"),
                        (model.intermediate_size, "intermediate_size")):
        if value % tp:
            raise ValidationError(f"{what} ({value}) is not divisible by tensor_parallel_size ({tp})",
                                  "tensor_parallel_size")
    kv = model.num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ValidationError(f"num_key_value_heads ({kv}) and tensor_parallel_size ({tp}) must divide one another",
                              "tensor_parallel_size")
