"""The core -> frontend contract: what one EngineCore.step() hands back. One object per step:
the per-request outputs, a snapshot of the core's state (for /metrics) and the request events
with their times (for per-request latency metrics). Times are time.monotonic()."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pagedserve.core.snapshot import EngineSnapshot
from pagedserve.engine_io import RequestId, TokenLogprobs


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step did to one request."""

    req_id: RequestId
    new_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_logprobs: TokenLogprobs | None = None
    new_prompt_logprobs: list[TokenLogprobs] | None = None
    num_cached_tokens: int = 0
    error: str | None = None   # why the engine failed this request (finish_reason "abort")
    error_param: str | None = None   # the request's parameter that caused it (a 4xx), if it did

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The core's state after a step."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0        # cumulative
    prefix_cache_queries: int = 0   # cumulative, tokens
    prefix_cache_hits: int = 0      # cumulative, tokens
    num_batched_tokens: int = 0     # tokens scheduled in the latest step
    # the host tier (core/kv_cache_manager.py)
    kv_offload_host_usage: float = 0.0      # fraction of host blocks held by swapped-out requests
    kv_offload_blocks_swapped_out: int = 0  # cumulative device -> host block copies
    kv_offload_blocks_swapped_in: int = 0   # cumulative host -> device block copies
    kv_offload_host_prefix_hits: int = 0    # cumulative prompt tokens loaded from the host tier
    # cumulative, counted as vLLM V1 counts them: a request's prompt when its first token arrives
    # (once for n > 1: its sequences share one prefill), every sampled token in the step it arrives
    prompt_tokens: int = 0
    generation_tokens: int = 0
    snapshot: EngineSnapshot | None = None   # only when requested (EngineCore.request_snapshot)
    # LoRA (enable_lora): the adapters of the running and of the waiting requests, by name
    running_loras: tuple[str, ...] = ()
    waiting_loras: tuple[str, ...] = ()


class RequestEventType(enum.Enum):
    QUEUED = "queued"             # add_request accepted it
    SCHEDULED = "scheduled"       # first scheduled (not again after a preemption)
    FIRST_TOKEN = "first_token"   # its first output token reached the host
    FINISHED = "finished"         # the core finished it in a step (stop, length, or a failed step)


@dataclass(frozen=True, slots=True)
class RequestEvent:
    req_id: RequestId
    type: RequestEventType
    timestamp: float
    finish_reason: str | None = None   # FINISHED only
    # FINISHED only: the sequence's output tokens (a final-only request's frontend has seen none
    # of them when it aborts: its metrics take the count from here, frontend/request_metrics.py);
    # None in the core process's answer to an abort of a sequence it no longer ran
    num_output_tokens: int | None = None


@dataclass(slots=True)
class EngineCoreOutputs:
    """One step's result. Events cover only requests whose state changed."""

    outputs: list[EngineCoreOutput]
    stats: EngineStats
    events: list[RequestEvent]
