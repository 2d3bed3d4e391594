"""The engine step: schedule -> execute -> update. Everything else is set-up.

EngineCore is driven from one thread (the offline loop or the async engine's background
thread); it is not thread-safe.

Async scheduling (config.device.async_scheduling; on by default for CUDA with TP=1) keeps one
step in flight: each call schedules and launches step N+1, then waits for step N's sampled
tokens and applies them, so the host's scheduling, input building and output handling run
while the device computes. A request that ends at step N (EOS, stop) was already scheduled
in N+1: that row's token is dropped. Requests whose sampling reads earlier outputs
(penalties) make the engine run in lockstep while they are alive.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestId, RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedserve.errors import ValidationError

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step did to one request."""

    req_id: RequestId
    new_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_logprobs: tuple[list[int], list[float], int] | None = None
    new_prompt_logprobs: list[tuple[list[int], list[float], int]] | None = None
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineCore:
    def __init__(self, config: EngineConfig, hf_config: Any, executor: Any = None) -> None:
        if executor is None:
            from pagedserve.worker.executor import make_executor
            executor = make_executor(config, hf_config)
        self.config = config
        self.executor = executor
        block_size = config.cache.block_size
        num_blocks = executor.num_blocks
        max_model_len = config.scheduler.max_model_len
        if num_blocks * block_size < max_model_len:
            raise ValidationError(
                f"the KV cache holds {num_blocks * block_size} tokens ({num_blocks} blocks of {block_size}), "
                f"fewer than max_model_len={max_model_len}: raise gpu_memory_utilization (or "
                f"kv_cache_memory_gb on CPU) or lower max_model_len", "max_model_len")
        logger.info("KV cache: %d blocks of %d tokens = %d tokens; max concurrency at max_model_len=%d: %.1fx",
                    num_blocks, block_size, num_blocks * block_size, max_model_len,
                    num_blocks * block_size / max_model_len)
        self.kv_cache_manager = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self._failed: tuple[list[RequestId], str] = ([], "")   # the last failed step's requests
        self.scheduler = Scheduler(self.kv_cache_manager, config.scheduler.max_num_seqs,
                                   config.scheduler.max_num_batched_tokens, max_model_len,
                                   config.scheduler.policy)
        self.async_scheduling = config.device.async_scheduling and getattr(executor, "supports_non_block", False)
        self._in_flight: tuple[SchedulerOutput, Any] | None = None   # launched, not yet applied

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache_manager.num_blocks

    def add_request(self, request: Request, forks: list[Request] | None = None) -> None:
        needed = self.kv_cache_manager.blocks_needed(request.num_prompt_tokens + 1)
        if needed > self.kv_cache_manager.num_blocks:
            raise ValidationError(
                f"the prompt ({request.num_prompt_tokens} tokens) can never fit in the KV cache "
                f"({self.kv_cache_manager.num_blocks * self.config.cache.block_size} tokens)", "prompt")
        self.scheduler.add_request(request, forks)

    def abort_requests(self, request_ids: list[RequestId]) -> list[Request]:
        """Finish these requests now and free their blocks (unknown ids are ignored)."""
        return self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: list[RequestId], status: RequestStatus) -> list[Request]:
        return self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def step(self) -> list[EngineCoreOutput]:
        if not self.async_scheduling:
            so = self.scheduler.schedule()
            return self._update(so, self._execute(so))
        outputs = []
        if self._in_flight is not None and self.scheduler.num_history_dependent:
            outputs = self._resolve()   # lockstep: the next step needs these tokens on the host
        so = self.scheduler.schedule()
        launched = self._launch(so)
        if self._in_flight is not None:
            outputs += self._resolve()
        self._in_flight = launched
        if launched is not None and (not launched[0].num_scheduled_tokens or self.scheduler.num_history_dependent):
            outputs += self._resolve()   # nothing to wait for, or lockstep
        return outputs

    def _launch(self, so: SchedulerOutput) -> tuple[SchedulerOutput, Any] | None:
        if so.is_empty and not (so.finished_req_ids or so.preempted_req_ids):
            return None
        try:
            return so, self.executor.execute_model(so, non_block=True)
        except Exception as exc:
            return so, exc

    def _resolve(self) -> list[EngineCoreOutput]:
        so, pending = self._in_flight
        self._in_flight = None
        try:
            if isinstance(pending, Exception):
                raise pending
            runner_output = pending if isinstance(pending, ModelRunnerOutput) else pending.get()
        except Exception as exc:   # fail this step's requests, keep serving the rest
            runner_output = self._step_failed(so, exc)
        return self._update(so, runner_output)

    def _execute(self, so: SchedulerOutput) -> ModelRunnerOutput | None:
        if so.is_empty and not (so.finished_req_ids or so.preempted_req_ids):
            return ModelRunnerOutput()
        try:
            return self.executor.execute_model(so)
        except Exception as exc:   # fail this step's requests, keep serving the rest
            return self._step_failed(so, exc)

    def _step_failed(self, so: SchedulerOutput, exc: Exception) -> None:
        self.executor.check_health()
        logger.error("step failed; failing its %d requests", len(so.num_scheduled_tokens), exc_info=exc)
        self._failed = (list(so.num_scheduled_tokens), f"{type(exc).__name__}: {exc}")
        return None

    def _update(self, so: SchedulerOutput, runner_output: ModelRunnerOutput | None) -> list[EngineCoreOutput]:
        if runner_output is None:
            failed_ids, message = self._failed
            failed = self.scheduler.finish_requests(failed_ids, RequestStatus.FINISHED_ERROR)
            return [EngineCoreOutput(r.request_id, finish_reason="abort", error=message) for r in failed]
        changed = self.scheduler.update_from_output(so, runner_output)
        logprobs = runner_output.logprobs
        outputs = [EngineCoreOutput(request.request_id, [request.output_token_ids[-1]], request.get_finish_reason(),
                                    request.stop_reason, logprobs.get(request.request_id) if logprobs else None,
                                    None, max(request.num_cached_tokens, 0))
                   for request in changed]
        for rid, prompt_logprobs in runner_output.prompt_logprobs.items():
            for out in outputs:
                if out.req_id == rid:
                    out.new_prompt_logprobs = prompt_logprobs
                    break
            else:
                outputs.append(EngineCoreOutput(rid, new_prompt_logprobs=prompt_logprobs))
        return outputs

    def shutdown(self) -> None:
        self.executor.shutdown()
