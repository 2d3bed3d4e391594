"""Where a rank runs and how many KV blocks it gets: kv_cache_memory_gb / num_kv_blocks on
CPU, gpu_memory_utilization after a profiled peak forward on GPU."""
from __future__ import annotations

import gc
import logging

import torch

from pagedserve.config import EngineConfig
from pagedserve.errors import ValidationError
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.profile_run import profile_run

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_GB = 1.0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = "cuda:0"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValidationError(f"device must be auto, cpu or cuda, got {device!r}", "device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValidationError("device='cuda' but no CUDA GPU is available", "device")
    return torch.device(device)


def non_torch_memory(device: torch.device) -> int:
    """Bytes in use on a CUDA device outside torch's caching allocator: the CUDA context,
    cuBLAS workspaces, NCCL buffers, kernel modules, other processes."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) - torch.cuda.memory_reserved(device)


def num_kv_blocks(config: EngineConfig, runner: ModelRunner, baseline_non_torch: int = 0) -> int:
    """How many KV blocks to allocate on this rank. `baseline_non_torch`: non_torch_memory()
    taken before the model was loaded (see _profile_cuda_kv_budget)."""
    cache, sched = config.cache, config.scheduler
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    bytes_per_block = runner.kv_bytes_per_block()
    if runner.device.type == "cuda":
        budget = _profile_cuda_kv_budget(config, runner, baseline_non_torch)
    else:
        budget = (cache.kv_cache_memory_gb or DEFAULT_CPU_KV_CACHE_GB) * 2**30
        # more blocks than every sequence at full length can use is wasted memory
        useful = sched.max_num_seqs * -(-sched.max_model_len // cache.block_size)
        return max(1, min(int(budget // bytes_per_block), useful))
    return max(0, int(budget // bytes_per_block))


def check_kv_fits(config: EngineConfig, num_blocks: int) -> None:
    """A KV cache that cannot hold one sequence of max_model_len is a configuration error, said
    before anything is built on it (the host tier, the CUDA graphs)."""
    block_size, max_model_len = config.cache.block_size, config.scheduler.max_model_len
    if num_blocks * block_size < max_model_len:
        raise ValidationError(
            f"the KV cache holds {num_blocks * block_size} tokens ({num_blocks} blocks of {block_size}), "
            f"fewer than max_model_len={max_model_len}: raise gpu_memory_utilization (or "
            f"kv_cache_memory_gb on CPU) or lower max_model_len", "max_model_len")


def num_host_blocks(config: EngineConfig, runner: ModelRunner) -> int:
    """Blocks of the host tier: kv_offloading_size GiB if set, else swap_space GiB, capped at
    what max_num_seqs sequences of max_model_len could hold (as the CPU device cache). The
    same on every TP rank (their shards' blocks are the same size)."""
    cache, sched = config.cache, config.scheduler
    gib = cache.kv_offloading_size if cache.kv_offloading_size is not None else cache.swap_space
    if not gib:
        return 0
    useful = sched.max_num_seqs * -(-sched.max_model_len // cache.block_size)
    return min(int(gib * 2**30 // runner.kv_bytes_per_block()), useful)


def _profile_cuda_kv_budget(config: EngineConfig, runner: ModelRunner, baseline_non_torch: int) -> float:
    """Bytes left for the KV cache: total * gpu_memory_utilization minus what this engine
    allocates besides it: the peak of a profiled forward at max_num_batched_tokens plus a
    sampler pass (weights included), and the non-torch memory it added since
    `baseline_non_torch` (cuBLAS workspaces, kernel modules). As in vLLM, the CUDA context
    that existed before the model was loaded is not charged to gpu_memory_utilization. An
    earlier engine of this process that nothing reaches but a reference cycle is collected
    first: its KV cache (most of the GPU) counted as this one's and left it 0 blocks."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    profile_run(runner, config.scheduler.max_num_batched_tokens)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    total = torch.cuda.mem_get_info()[1]
    non_torch = max(non_torch_memory(runner.device) - baseline_non_torch, 0)
    budget = total * config.cache.gpu_memory_utilization - peak - non_torch
    torch.cuda.empty_cache()
    logger.info("memory: total %.1f GiB, peak forward %.2f GiB, non-torch %.2f GiB (+%.2f GiB before loading), "
                "KV budget %.2f GiB", total / 2**30, peak / 2**30, non_torch / 2**30, baseline_non_torch / 2**30,
                budget / 2**30)
    return budget

