"""The engine step: schedule -> execute -> update. Everything else is set-up.

EngineCore is driven from one thread (the offline loop or the async engine's background
thread); it is not thread-safe. Each step returns one EngineCoreOutputs (core/outputs.py):
the outputs, the core's stats and the request events (queued, scheduled, first token,
finished); the frontend reads the core's state through nothing else (and stats() when idle).

Async scheduling (config.device.async_scheduling, and an executor that takes more than one
batch at a time) keeps one step in flight: each call schedules and launches step N+1, then
waits for step N's sampled tokens and applies them, so the host's scheduling, input building
and output handling run while the device computes. A request that ends at step N (EOS, stop)
was already scheduled in N+1: that row's token is dropped. Requests whose sampling reads
earlier outputs (penalties) make the engine run in lockstep while they are alive. A step
with constrained rows (structured outputs) is sampled at the next call, right before the
step after it is launched: its grammar mask is filled in the grammar process meanwhile, from
the tokens of the step before, which the process takes from the device as soon as that step
is sampled, while this thread launches, waits, hands the outputs over and schedules
(core/structured_output.py).

With an executor of more than two concurrent batches (pipeline parallelism: one per stage),
the same loop keeps up to `max_concurrent_batches` steps in flight, a FIFO queue as vLLM's
batch queue: each call launches a step if the queue has room and waits for the oldest only
when the queue is full or nothing new could be scheduled.
"""
from __future__ import annotations

import logging
import time
from collections import deque

from pagedserve.config import EngineConfig, shares_sampled_ids
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.outputs import EngineCoreOutput, EngineCoreOutputs, EngineStats, RequestEvent, RequestEventType
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.core.snapshot import StepLog
from pagedserve.core.structured_output import PendingFill, ProcessGrammars
from pagedserve.engine_io import (DeferredSampling, Executor, ModelRunnerOutput, PendingOutput, RequestId,
                                  SchedulerOutput, WindowOutput)
from pagedserve.errors import ValidationError
from pagedserve.lora_request import LoadedLoRA
from pagedserve.worker.executor import make_executor

logger = logging.getLogger(__name__)

_QUEUED, _SCHEDULED = RequestEventType.QUEUED, RequestEventType.SCHEDULED
_FIRST_TOKEN, _FINISHED = RequestEventType.FIRST_TOKEN, RequestEventType.FINISHED
_RUNNING_STATUS = RequestStatus.RUNNING
# a launched step: its scheduler output and its result (or what launching it raised)
_Launched = tuple[SchedulerOutput, ModelRunnerOutput | PendingOutput | DeferredSampling | Exception]


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        if executor is None:
            executor = make_executor(config)
        self.config = config
        self.executor = executor
        self.weight_bytes = getattr(executor, "weight_bytes", 0)   # model weights on rank 0 (/metrics)
        block_size = config.cache.block_size
        num_blocks = executor.num_blocks
        max_model_len = config.scheduler.max_model_len
        num_host_blocks = getattr(executor, "num_host_blocks", 0)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%s); max concurrency at max_model_len=%d: "
                    "%.1fx; host tier: %d blocks = %d tokens", num_blocks, block_size, num_blocks * block_size,
                    config.cache.cache_dtype, max_model_len, num_blocks * block_size / max_model_len,
                    num_host_blocks, num_host_blocks * block_size)
        self.kv_cache_manager = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching,
                                               num_host_blocks)
        self.scheduler = Scheduler(self.kv_cache_manager, config.scheduler.max_num_seqs,
                                   config.scheduler.max_num_batched_tokens, max_model_len,
                                   config.scheduler.policy, config.scheduler.preemption_mode,
                                   config.scheduler.lora.max_loras if config.scheduler.lora else 0)
        self.async_scheduling = config.device.async_scheduling and executor.max_concurrent_batches > 1
        self.scheduler.micro_batches = max(1, getattr(config.parallel, "pipeline_parallel_size", 1))
        # decode windows: in one process, or where every rank takes each step's sampled ids from
        # rank 0's device broadcast (shares_sampled_ids: async TP, no PP)
        parallel = config.parallel
        if parallel.world_size == 1 or shares_sampled_ids(config.device.async_scheduling, parallel.tensor_parallel_size,
                                                          parallel.pipeline_parallel_size):
            self.scheduler.num_scheduler_steps = config.scheduler.num_scheduler_steps
        elif config.scheduler.num_scheduler_steps > 1:
            logger.warning("num_scheduler_steps=%d runs one step a schedule here: decode windows need one process "
                           "or tensor parallelism with async scheduling, and no pipeline parallelism",
                           config.scheduler.num_scheduler_steps)
        # picked once; an unbound function, so the core holds no reference cycle to itself (a
        # bound method would keep a dropped engine's KV cache alive until the cycle collector ran)
        self._step_impl = EngineCore._step_async if self.async_scheduling else EngineCore._step_lockstep
        # async: a step's grammar bitmask is filled after the previous step's tokens are applied.
        # Not under PP: its micro-batches never hold a request whose token is in flight, so the
        # bitmask is filled at schedule time and no DeferredSampling is launched.
        self.scheduler.defer_grammar = self.async_scheduling and self.scheduler.micro_batches == 1
        if self.scheduler.defer_grammar:   # accept + fill in a grammar process, beside this thread
            self.scheduler.grammars = ProcessGrammars(config.scheduler.max_num_seqs)
        self._in_flight: deque[_Launched] = deque()   # launched, not yet applied, oldest first (async only)
        # the newest step in flight's grammar bitmask, on its way (async only), and the outputs
        # of requests failed when it arrived (a token their grammar refused, learned a step late)
        self._pending_fill: PendingFill | None = None
        self._fill_error: Exception | None = None   # what posting the next step's fill raised
        self._posted_step: SchedulerOutput | None = None   # the last step whose tokens were posted
        self._late_outputs: list[EngineCoreOutput] = []
        # Event bookkeeping, touched only for requests that change state.
        self._events: list[RequestEvent] = []                  # since the last step
        self._unscheduled: dict[RequestId, Request] = {}       # queued, never scheduled
        self._awaiting_first_token: dict[RequestId, Request] = {}
        self._num_prompt_tokens = 0       # EngineStats.prompt_tokens
        self._num_generation_tokens = 0   # EngineStats.generation_tokens
        self._step_log: StepLog | None = None   # while a viewer watches (core/snapshot.py)

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
        now = time.monotonic()
        for queued in [request, *(forks or ())]:
            self._unscheduled[queued.request_id] = queued
            self._events.append(RequestEvent(queued.request_id, _QUEUED, now))

    def add_lora(self, lora: LoadedLoRA) -> None:
        """vLLM's add_lora utility call, between steps: every rank's host cache keeps the adapter
        the frontend read and checked (frontend/lora_registry.py), before any request runs it; a
        step that puts it in a device slot then only copies it. Nothing is read here."""
        self.executor.add_lora(lora)

    def remove_lora(self, lora_int_id: int) -> None:
        """The ranks drop an adapter's host copy (no request runs it; its device slot, if it holds
        one still, keeps it until another adapter takes the slot)."""
        self.executor.remove_lora(lora_int_id)

    def abort_requests(self, request_ids: list[RequestId]) -> list[RequestEvent]:
        """Finish these requests now and free their blocks (unknown ids are ignored). The answer:
        a FINISHED event for each id, with its output token count where the core ran it (None
        where not): a final-only request's frontend has read none of its tokens."""
        finished = self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        counts = {r.request_id: len(r.output_token_ids) for r in finished}
        now = time.monotonic()
        return [RequestEvent(rid, _FINISHED, now, "abort", counts.get(rid)) for rid in request_ids]

    def finish_requests(self, request_ids: list[RequestId], status: RequestStatus) -> list[Request]:
        finished = self.scheduler.finish_requests(request_ids, status)
        for request in finished:
            self._unscheduled.pop(request.request_id, None)
            self._awaiting_first_token.pop(request.request_id, None)
        return finished

    def is_alive(self) -> bool:
        """The executor's liveness (every TP rank); cheap, safe from any thread."""
        try:
            self.executor.check_health()
        except Exception:
            return False
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._in_flight)

    def stats(self) -> EngineStats:
        """The core's state now; with an EngineSnapshot when one was requested since the last."""
        scheduler, kv = self.scheduler, self.kv_cache_manager
        log = self._step_log
        usage = kv.usage()
        return EngineStats(len(scheduler.running), len(scheduler.waiting), usage,
                           scheduler.stats.num_preemptions, kv.stats.queries, kv.stats.hits,
                           scheduler.stats.num_batched_tokens, kv.host_usage(), kv.stats.blocks_swapped_out,
                           kv.stats.blocks_swapped_in, kv.stats.host_hits, self._num_prompt_tokens,
                           self._num_generation_tokens,
                           log.take(scheduler, usage) if log is not None and log.requested else None,
                           *(_adapters(scheduler.running), _adapters(scheduler.waiting))
                           if scheduler.lora_slots is not None else ())

    def request_snapshot(self) -> None:
        """The next stats (a step's, or stats()) carry an EngineSnapshot; steps are logged for
        it from now on, until stop_snapshots(). Cheap; the building happens then."""
        if self._step_log is None:
            self._step_log = StepLog()
        self._step_log.requested = True

    def stop_snapshots(self) -> None:
        """Nobody watches any more: steps are no longer logged."""
        self._step_log = None

    def step(self) -> EngineCoreOutputs:
        """Schedule -> execute -> update: _step_lockstep or _step_async, picked at construction."""
        return self._step_impl(self)

    # ---- one step: one of these two, picked at construction ---------------------------------
    def _step_lockstep(self) -> EngineCoreOutputs:
        so = self._schedule()
        if not so.has_work:
            return self._result(self._update(so, ModelRunnerOutput()))
        try:
            runner_output = self.executor.execute_model(so)
        except Exception as exc:   # fail this step's requests, keep serving the rest
            return self._result(self._fail(so, exc))
        return self._result(self._update(so, runner_output))   # non_block=False: never a PendingOutput

    def _step_async(self) -> EngineCoreOutputs:
        outputs: list[EngineCoreOutput] = []
        queue = self._in_flight
        so = self._schedule()
        # the step in flight gets the mask filled while the outputs were handed over and `so`
        # scheduled, and is sampled; its tokens go to the grammar process from the device, and
        # `so`'s fill starts now, beside the launch, the wait and the update below
        self._start_fill(self._sample_pending())
        launched = self._bind_fill(self._launch(so))
        if queue and (launched is None or len(queue) + 1 >= self.executor.max_concurrent_batches):
            previous = queue.popleft()
            result = self._wait(previous)
            if isinstance(result, Exception):
                # the steps launched on top of the failed one finish; their results are dropped
                if launched is not None:
                    queue.append(launched)
                    launched = None
                outputs += self._fail(previous[0], result, self._drop_in_flight())
            else:
                outputs += self._update(previous[0], result)
        if launched is not None:
            queue.append(launched)
        if launched is not None and not launched[0].num_scheduled_tokens:
            outputs += self._resolve()   # nothing to wait for
        return self._result(outputs)

    def _schedule(self) -> SchedulerOutput:
        so = self.scheduler.schedule()
        if self._step_log is not None:
            self._step_log.pending = so
        if self._unscheduled and (so.new_requests or so.forked_requests):
            for rid in [new.req_id for new in so.new_requests] + [fork.req_id for fork in so.forked_requests]:
                request = self._unscheduled.pop(rid, None)
                if request is not None:
                    self._events.append(RequestEvent(rid, _SCHEDULED, request.first_scheduled_time))
                    self._awaiting_first_token[rid] = request
        return so

    def _launch(self, so: SchedulerOutput) -> _Launched | None:
        if not so.has_work:
            return None
        try:
            return so, self.executor.execute_model(so, non_block=True)
        except Exception as exc:
            return so, exc

    def _start_fill(self, sampled: tuple[SchedulerOutput, list[int]] | None = None) -> None:
        """Post the grammar work: the tokens of `sampled` (a step just sampled, its constrained
        rows' rows in the sampled ids) and the fill of the step just scheduled, if deferred.
        What posting raised fails that step once launched (_bind_fill)."""
        try:
            self._pending_fill = self.scheduler.deferred_grammar_bitmask(*(sampled or ()))
        except Exception as exc:
            self._pending_fill, self._fill_error = None, exc
        if sampled is not None:
            self._posted_step = sampled[0]   # its tokens are in the matchers before its update

    def _bind_fill(self, launched: _Launched | None) -> _Launched | None:
        """The fill posted before `launched` was launched belongs to it if it waits for its
        bitmask (DeferredSampling); else it is taken and dropped. A step whose fill could not
        start is sampled unmasked, dropped, and fails."""
        fill, error = self._pending_fill, self._fill_error
        self._fill_error = None
        deferred = launched is not None and isinstance(launched[1], DeferredSampling)
        if error is not None and deferred:
            self._wait(launched)   # sampled unmasked and dropped: every rank finishes the step
            return launched[0], error
        if fill is not None and not deferred:
            self._pending_fill = None
            self.scheduler.grammars.drop(fill)
        return launched

    def _sample_pending(self) -> tuple[SchedulerOutput, list[int]] | None:
        """The newest step in flight, if it waits for its bitmask, gets it and is sampled:
        before anything else is launched or waited for (the next step's inputs may be its
        sampled ids). Requests whose last token broke their grammar fail now. Returns the
        step and its constrained rows' rows in the sampled ids when those ids go to the
        grammars' buffer (the grammar process takes them from there), else None."""
        if self._pending_fill is None:
            return None
        fill, self._pending_fill = self._pending_fill, None
        so, deferred = launched = self._in_flight.pop()
        try:
            bitmask = fill.result()
        except Exception as exc:
            self._wait(launched)   # sampled unmasked and dropped: every rank finishes the step
            self._in_flight.append((so, exc))
            return None
        sampled = None
        try:
            ids = self.scheduler.grammars.sampled_ids()
            self._in_flight.append((so, deferred.sample(bitmask, ids)))
            if ids is not None:
                sampled = so, deferred.grammar_rows
        except Exception as exc:
            self._in_flight.append((so, exc))
        for request, error, param in fill.failed:
            self._late_outputs += self._fail_requests([request.request_id], error, param)
        return sampled

    def _resolve(self) -> list[EngineCoreOutput]:
        """Apply every step in flight, oldest first."""
        self._start_fill(self._sample_pending())
        self._bind_fill(None)   # its tokens' accepts, taken now (no step follows)
        outputs: list[EngineCoreOutput] = []
        while self._in_flight:
            launched = self._in_flight.popleft()
            result = self._wait(launched)
            if isinstance(result, Exception):
                return outputs + self._fail(launched[0], result, self._drop_in_flight())
            outputs += self._update(launched[0], result)
        return outputs

    def _drop_in_flight(self) -> list[SchedulerOutput]:
        """After a failed step: the steps launched on top of it finish; their results are dropped."""
        self._sample_pending()
        dropped = []
        while self._in_flight:
            launched = self._in_flight.popleft()
            self._wait(launched)
            dropped.append(launched[0])
        return dropped

    @staticmethod
    def _wait(launched: _Launched) -> ModelRunnerOutput | Exception:
        """A launched step's output, or what it raised."""
        pending = launched[1]
        try:
            if isinstance(pending, Exception):
                return pending
            return pending if isinstance(pending, (ModelRunnerOutput, WindowOutput)) else pending.get()
        except Exception as exc:
            return exc

    def _fail(self, so: SchedulerOutput, exc: Exception, dropped: list[SchedulerOutput] = ()
              ) -> list[EngineCoreOutput]:
        """A step raised (re-raises EngineDeadError if the executor itself is gone). If the
        step held one user request (a request and its parallel samples), it fails with the
        error text. Otherwise nothing fails yet: the step's requests are recomputed, each
        alone first (Scheduler.suspects), so the culprit fails alone and the others go on;
        a request caught in failed steps twice fails. `dropped`: steps launched on top of
        the failed one, whose results are discarded (their requests are recomputed too)."""
        self.executor.check_health()
        if so is self._posted_step:   # the grammar process took its tokens; they are not applied
            requests = self.scheduler.requests
            self.scheduler.grammars.take_back([requests[rid] for rid in so.structured_req_ids if rid in requests])
        for failed in (so, *dropped):   # their copies may not have run
            if failed.blocks_to_swap_out or failed.blocks_to_swap_in:
                self.scheduler.drop_swaps(failed)
        error = f"{type(exc).__name__}: {exc}"
        step_ids = list(so.num_scheduled_tokens)
        requests = self.scheduler.requests
        families = {(requests[rid].parent_id or rid) if rid in requests else rid for rid in step_ids}
        others = list(dict.fromkeys(rid for d in dropped for rid in d.num_scheduled_tokens
                                    if rid not in so.num_scheduled_tokens))
        if len(families) <= 1:
            logger.error("step failed; failing its request %s", next(iter(families), "?"), exc_info=exc)
            self.scheduler.requeue_after_failure(others, suspects=set())
            return self._fail_requests(step_ids, error)
        logger.warning("a step of %d requests failed (%s); retrying them one by one", len(step_ids), error)
        give_up = self.scheduler.requeue_after_failure(step_ids + others, suspects=set(step_ids))
        return self._fail_requests(give_up, error)

    def _fail_requests(self, request_ids: list[RequestId], error: str,
                       param: str | None = None) -> list[EngineCoreOutput]:
        self.scheduler.uncache(request_ids)   # their last step may not have written its KV
        failed = self.finish_requests(request_ids, RequestStatus.FINISHED_ERROR)
        now = time.monotonic()
        self._events += [RequestEvent(r.request_id, _FINISHED, now, "abort", len(r.output_token_ids)) for r in failed]
        return [EngineCoreOutput(r.request_id, list(r.output_token_ids) if r.report_final_only else [], "abort",
                                 error=error, error_param=param) for r in failed]

    def _update(self, so: SchedulerOutput, runner_output: ModelRunnerOutput | WindowOutput) -> list[EngineCoreOutput]:
        if isinstance(runner_output, WindowOutput):   # a decode window: its steps in order
            return [out for step in runner_output.steps for out in self._update(so, step)]
        changed = self.scheduler.update_from_output(so, runner_output)   # each got one token
        self._num_generation_tokens += len(changed)
        now = time.monotonic()
        events = self._events
        if self._awaiting_first_token:
            for rid, request in list(self._awaiting_first_token.items()):
                if request.output_token_ids:
                    events.append(RequestEvent(rid, _FIRST_TOKEN, now))
                    del self._awaiting_first_token[rid]
                    if not request.index:   # n > 1: the siblings (index 1...) share this prefill
                        self._num_prompt_tokens += request.num_prompt_tokens
        logprobs = runner_output.logprobs
        outputs = []
        append = outputs.append
        for request in changed:   # every row that got a token, every step: kept lean
            running, final_only = request.status == _RUNNING_STATUS, request.report_final_only
            if running and final_only:
                continue   # reported once, when it finishes
            rid = request.request_id
            reason = None if running else request.get_finish_reason()
            append(EngineCoreOutput(rid, list(request.output_token_ids) if final_only else [request.output_token_ids[-1]],
                                    reason, request.stop_reason, logprobs.get(rid) if logprobs else None, None,
                                    max(request.num_cached_tokens, 0), request.error, request.error_param))
            if reason is not None:
                events.append(RequestEvent(rid, _FINISHED, now, reason, len(request.output_token_ids)))
        for rid, prompt_logprobs in runner_output.prompt_logprobs.items():
            for out in outputs:
                if out.req_id == rid:
                    out.new_prompt_logprobs = prompt_logprobs
                    break
            else:
                outputs.append(EngineCoreOutput(rid, new_prompt_logprobs=prompt_logprobs))
        return outputs

    def _result(self, outputs: list[EngineCoreOutput]) -> EngineCoreOutputs:
        events, self._events = self._events, []
        if self._late_outputs:
            outputs, self._late_outputs = self._late_outputs + outputs, []
        if self._step_log is not None:
            self._step_log.log(events, len(outputs))
        return EngineCoreOutputs(outputs, self.stats(), events)

    def shutdown(self) -> None:
        self.scheduler.grammars.shutdown()
        self.executor.shutdown()


def _adapters(requests) -> tuple[str, ...]:
    """The LoRA adapters' names of these requests, each once, sorted."""
    return tuple(sorted({r.lora_request.lora_name for r in requests if r.lora_request is not None}))
