"""Per-request timing and token counts, kept in one place. Fed by the core's request events
(core/outputs.py) and by the RequestOutputs of each step; gives every RequestOutput its
`metrics` ("arrival_time", "first_token_time": vLLM's offline API, read by the TGI routes) and,
when a request ends, hands a FinishedRequestStats to the finish listeners (the server's
Prometheus metrics). Times are time.monotonic(). Used from the engine's one driver thread."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from pagedserve.core.outputs import RequestEvent, RequestEventType
from pagedserve.engine_io import RequestId
from pagedserve.outputs import RequestOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FinishedRequestStats:
    """One finished (or aborted, or failed) request."""

    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    arrival_time: float                  # the frontend accepted it
    queued_time: float | None            # the core queued it
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float


FinishListener = Callable[[FinishedRequestStats], None]
FirstTokenListener = Callable[[float], None]   # a request's time to first token (s), when it arrives


@dataclass(slots=True)
class _Timing:
    core_ids: list[RequestId]   # its sequences in the core (n > 1: one per sample)
    num_prompt_tokens: int
    delta: bool                 # its outputs carry only what is new
    arrival_time: float
    queued_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_generation_tokens: int = 0
    final_only: bool = False    # the core reports each sequence only at its end (LLMEngine.process_request)
    finish_time: float | None = None   # aborted, its counts awaited from the core
    awaiting: int = 0           # of its sequences' FINISHED events (with their token counts)


class RequestMetrics:
    def __init__(self) -> None:
        self.listeners: list[FinishListener] = []
        self.first_token_listeners: list[FirstTokenListener] = []
        self._requests: dict[str, _Timing] = {}
        self._of_core_id: dict[RequestId, _Timing] = {}
        # aborted final-only requests' sequences whose token counts the core still owes
        # (its answer to the abort comes before any event of a later request of the same id, but
        # an id aborted again before that answer, a reuse vLLM forbids too, may take the wrong count)
        self._awaiting: dict[RequestId, _Timing] = {}

    def add(self, request_id: str, core_ids: list[RequestId], num_prompt_tokens: int, delta: bool,
            arrival_time: float, final_only: bool = False) -> None:
        timing = _Timing(core_ids, num_prompt_tokens, delta, arrival_time, final_only=final_only)
        self._requests[request_id] = timing
        for core_id in core_ids:
            self._of_core_id[core_id] = timing

    def record(self, events: list[RequestEvent]) -> None:
        """A step's events; the first of each kind among a request's sequences counts."""
        for event in events:
            if event.type is RequestEventType.FINISHED and event.req_id in self._awaiting:
                self._counted(self._awaiting.pop(event.req_id), event.num_output_tokens)
                continue
            timing = self._of_core_id.get(event.req_id)
            if timing is None:
                continue
            kind = event.type
            if kind is RequestEventType.FIRST_TOKEN:
                if timing.first_token_time is None:
                    timing.first_token_time = event.timestamp
                    _notify(self.first_token_listeners, event.timestamp - timing.arrival_time, "first-token")
            elif kind is RequestEventType.SCHEDULED:
                if timing.first_scheduled_time is None:
                    timing.first_scheduled_time = event.timestamp
            elif kind is RequestEventType.QUEUED:
                if timing.queued_time is None:
                    timing.queued_time = event.timestamp
            else:   # FINISHED: this sequence reports nothing more
                del self._of_core_id[event.req_id]

    def observe(self, output: RequestOutput, await_counts: bool = False) -> None:
        """Count an output's tokens and set its metrics; a finished request is reported to
        the listeners and forgotten. The output of a final-only request aborted here
        (`await_counts`) holds none of the tokens its open sequences made: their counts come
        as the core's answer to the abort (FINISHED events, record), and the request is
        reported once the last arrives."""
        timing = self._requests.get(output.request_id)
        if timing is None:
            return
        num_tokens = sum(len(c.token_ids) for c in output.outputs)
        timing.num_generation_tokens = timing.num_generation_tokens + num_tokens if timing.delta else num_tokens
        metrics = {"arrival_time": timing.arrival_time}
        if timing.first_token_time is not None:
            metrics["first_token_time"] = timing.first_token_time
        output.metrics = metrics
        if not output.finished:
            return
        del self._requests[output.request_id]
        reasons = {c.finish_reason for c in output.outputs}
        reason = "abort" if "abort" in reasons else "length" if "length" in reasons else "stop"
        # its sequences whose FINISHED event has not come (the others' tokens are in the output)
        open_ids = [core_id for core_id in timing.core_ids if self._of_core_id.pop(core_id, None) is not None]
        if reason == "abort" and timing.final_only and open_ids and await_counts:
            timing.finish_time, timing.awaiting = time.monotonic(), len(open_ids)
            self._awaiting.update(dict.fromkeys(open_ids, timing))
            return
        self._report(timing, reason, time.monotonic())

    def _counted(self, timing: _Timing, num_tokens: int | None) -> None:
        """One awaited sequence's count came; the request is reported with the last."""
        timing.num_generation_tokens += num_tokens or 0
        timing.awaiting -= 1
        if not timing.awaiting:
            self._report(timing, "abort", timing.finish_time)

    def _report(self, timing: _Timing, reason: str, finish_time: float) -> None:
        if not self.listeners:
            return
        stats = FinishedRequestStats(reason, timing.num_prompt_tokens, timing.num_generation_tokens,
                                     timing.arrival_time, timing.queued_time, timing.first_scheduled_time,
                                     timing.first_token_time, finish_time)
        _notify(self.listeners, stats, "finish")


def _notify(listeners: list, arg, what: str) -> None:
    """Call each listener with arg; one that raises is logged and the others still run."""
    for listener in listeners:
        try:
            listener(arg)
        except Exception:
            logger.exception("%s listener failed", what)
