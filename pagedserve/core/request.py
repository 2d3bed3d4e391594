"""A request as the core sees it: token ids, counters and an ordered status. No tensors."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pagedserve.engine_io import RequestId
from pagedserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered: every status after PREEMPTED is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @staticmethod
    def is_finished(status: "RequestStatus") -> bool:
        return status > RequestStatus.PREEMPTED


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "abort",
}


@dataclass(eq=False, slots=True)   # identity: `running.remove(request)` must not compare every field of every request
class Request:
    """Token counters obey: num_computed_tokens <= num_tokens = len(prompt) + len(output).

    `num_computed_tokens` is what the KV cache holds; the scheduler makes it catch up with
    `num_tokens` (plus any sampled token still in flight) under the step's token budget
    (prefill, chunked prefill, decode and recompute after preemption are all that one rule).
    """

    request_id: RequestId
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_tokens: int = 16
    cache_salt: str | None = None
    # Parallel sampling: the sibling sequences of one user request share `parent_id`.
    parent_id: RequestId | None = None
    index: int = 0
    # Scheduling policy "priority": lower runs first; ties in arrival order (arrival_index, set
    # by the scheduler when the request is added; a request's parallel samples share it)
    priority: int = 0
    arrival_index: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Scheduled in steps whose results are not back yet (async scheduling keeps one step in
    # flight): tokens being computed, and sampled tokens not yet appended (0 or 1).
    num_unresolved_tokens: int = 0
    num_inflight_samples: int = 0
    num_cached_tokens: int = -1   # prefix-cache hit at first schedule; -1 = not scheduled yet
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    num_step_failures: int = 0   # steps that raised with this request in them
    first_scheduled_time: float | None = None   # read by the async engine's metrics
    # Structured outputs: the compiled grammar (opaque, from the frontend) and this sequence's
    # own matcher (core/structured_output.py, created at its first sampling step).
    grammar: Any = None
    grammar_matcher: Any = None
    error: str | None = None   # why the core failed it (FINISHED_ERROR), for the frontend
    # set when the request's own parameters caused that failure: the frontend raises a
    # ValidationError naming it (a 4xx), not an engine failure
    error_param: str | None = None
    # The frontend reads this sequence only once it ends (a final-only output with no stop
    # strings and no logprobs: LLM.generate, non-streaming server requests): the core reports
    # its tokens all at once when it finishes, not one output a step (EngineCore._update).
    report_final_only: bool = False
    # LoRA: the adapter (None: the base model) and, while it runs, its device slot (core/lora_slots.py)
    lora_request: Any = None
    lora_slot: int = -1

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_scheduled_tokens_ahead(self) -> int:
        """Tokens whose KV is computed or being computed: where the next step starts."""
        return self.num_computed_tokens + self.num_unresolved_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_range(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the full list."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - num_prompt]

    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    def get_finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self.status)
