"""What a dashboard viewer sees of the core: the KV block pool, the block tables and the
queues at one moment, and the steps run since the previous snapshot (what each request
was scheduled: a prefill chunk or a decode; arrivals, finishes, preemptions).

Nothing here runs unless a viewer asked (EngineCore.request_snapshot): then the core keeps
a StepLog, which turns each step into a StepView as it returns, and builds an EngineSnapshot
when one is due, in O(blocks in use + prefix-cache entries + requests + logged steps). A
step in which the same requests as in the one before decode one token each (most steps) is
only compared with that one (C-level dict and set operations) and marked `repeat`; other
steps are classified request by request. A StepView holds the step's own scheduled-tokens
dict and a few tuples, never the SchedulerOutput (keeping hundreds of request objects per
step alive would make the garbage collector's passes longer). Per-block state is two byte
strings (ref counts, hash flags), not per-block objects.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from pagedserve.engine_io import BlockId, RequestId, SchedulerOutput

if TYPE_CHECKING:
    from pagedserve.core.request import Request
    from pagedserve.core.scheduler import Scheduler

MAX_LOGGED_STEPS = 4096   # steps kept between two snapshots; older ones are dropped (counted)


class StepView(NamedTuple):
    """One engine step as the timeline shows it (a NamedTuple: one is made per step)."""

    step: int                               # the log's step counter (steps while watched)
    time: float                             # time.monotonic() when the step returned
    scheduled: dict[RequestId, int]         # tokens computed per request (the step's own dict)
    prefill: tuple[RequestId, ...]          # whose tokens were a prefill chunk (or a resume); others decoded
    preempted: tuple[RequestId, ...]        # sent back to the queue, blocks freed (recomputed later)
    arrived: tuple[RequestId, ...]          # queued since the previous step
    finished: tuple[tuple[RequestId, str], ...]   # (id, finish reason)
    num_generated: int                      # requests that got a token
    repeat: bool = False                    # the same requests as the step before, each decoding one token


class RequestView(NamedTuple):
    """One request (a NamedTuple: cheap to make by the hundred)."""

    req_id: RequestId
    parent_id: RequestId | None             # parallel samples (n > 1) share their parent's prompt blocks
    num_prompt_tokens: int
    num_output_tokens: int
    num_computed_tokens: int
    num_cached_tokens: int                  # prompt tokens served by the prefix cache (0 before scheduling)
    max_tokens: int
    num_preemptions: int
    block_ids: tuple[BlockId, ...]          # block table: logical block i -> physical block_ids[i]


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """The core after a step. Block b is in use iff ref_counts[b] > 0 (held by that many
    requests: > 1 is a shared prefix or an n > 1 fork); a free block with cached[b] == 1 still
    holds a prefix-cache entry (cached-free, revivable); otherwise it is free."""

    time: float                             # time.monotonic()
    step: int                               # the log's step counter at the snapshot
    block_size: int
    max_model_len: int
    max_num_seqs: int
    ref_counts: bytes                       # per physical block, saturated at 255
    cached: bytes                           # per physical block: 1 if its hash is set
    running: tuple[RequestView, ...]        # in scheduling order
    waiting: tuple[RequestView, ...]        # in queue order (preempted ones first again)
    steps: tuple[StepView, ...]             # since the previous snapshot, oldest first
    num_dropped_steps: int                  # steps since the previous snapshot not kept (log bound)
    num_preemptions: int                    # cumulative
    kv_cache_usage: float
    tokens_per_s: float                     # tokens computed (prefill + decode) since the previous snapshot
    generated_per_s: float                  # tokens sampled since the previous snapshot
    build_seconds: float = 0.0              # CPU time building this snapshot took (engine thread)

    @property
    def num_blocks(self) -> int:
        return len(self.ref_counts)

    @property
    def used_block_ids(self) -> list[BlockId]:
        return [BlockId(b) for b, count in enumerate(self.ref_counts) if count]

    @property
    def cached_free_block_ids(self) -> list[BlockId]:
        return [BlockId(b) for b, (count, cached) in enumerate(zip(self.ref_counts, self.cached))
                if not count and cached]

    def owners(self, block_id: BlockId) -> list[RequestId]:
        return [r.req_id for r in self.running if block_id in r.block_ids]


class RequestEvent(Protocol):
    """core/outputs.RequestEvent as read here (outputs.py imports this module)."""
    req_id: RequestId
    type: Any                  # RequestEventType; its value is compared
    finish_reason: str | None


class StepLog:
    """The core's record of steps while a viewer watches (engine thread only)."""

    def __init__(self, max_steps: int = MAX_LOGGED_STEPS) -> None:
        self._steps: deque[StepView] = deque(maxlen=max_steps)
        self.num_steps = 0
        self._num_taken = 0                 # step counter at the previous snapshot
        self._last_time = time.monotonic()
        self.pending: SchedulerOutput | None = None   # scheduled in the running step call
        self.requested = False              # the next stats carry a snapshot
        self._previous: dict[RequestId, int] = {}   # the last logged step's scheduled tokens
        self._in_prompt: set[RequestId] = set()     # prefill started, nothing sampled yet

    def log(self, events: list[RequestEvent], num_outputs: int) -> None:
        """One step returned: what it scheduled (`pending`) and its events, as a StepView (a
        step that scheduled nothing and changed nothing is not logged)."""
        so, self.pending = self.pending, None
        if not events and (so is None or not so.num_scheduled_tokens):
            return
        self.num_steps += 1
        self._steps.append(self._step_view(self.num_steps, time.monotonic(), so, events, num_outputs))

    def take(self, scheduler: Scheduler, kv_cache_usage: float) -> EngineSnapshot:
        """The snapshot now, with the steps logged since the previous one (then forgotten)."""
        started = time.thread_time()   # the CPU it costs, not the wall time (preemption on a busy host)
        kv = scheduler.kv
        pool = kv.pool
        ref_counts = bytearray(pool.num_blocks)
        cached = bytearray(pool.num_blocks)
        for block in pool.cached.values():
            cached[block.block_id] = 1
        for blocks in kv.req_to_blocks.values():
            for block in blocks:
                ref_counts[block.block_id] = block.ref_cnt if block.ref_cnt < 255 else 255
                if block.block_hash is not None:
                    cached[block.block_id] = 1
        now = time.monotonic()
        if self._in_prompt:
            self._in_prompt.intersection_update(scheduler.requests)
        steps = tuple(self._steps)
        num_dropped = self.num_steps - self._num_taken - len(steps)
        elapsed = max(now - self._last_time, 1e-9)
        snapshot = EngineSnapshot(
            now, self.num_steps, kv.block_size, scheduler.max_model_len, scheduler.max_num_seqs,
            bytes(ref_counts), bytes(cached),
            tuple(_request_view(r, kv.req_to_blocks.get(r.request_id, ())) for r in scheduler.running),
            tuple(_request_view(r, ()) for r in scheduler.waiting),
            steps, num_dropped, scheduler.stats.num_preemptions, kv_cache_usage,
            sum(sum(s.scheduled.values()) for s in steps) / elapsed,
            sum(s.num_generated for s in steps) / elapsed, time.thread_time() - started)
        self._steps.clear()
        self._num_taken, self._last_time, self.requested = self.num_steps, now, False
        return snapshot

    def _step_view(self, step: int, when: float, so: SchedulerOutput | None, events: list[RequestEvent],
                   num_outputs: int) -> StepView:
        scheduled = so.num_scheduled_tokens if so is not None else {}
        previous, self._previous = self._previous, scheduled
        arrived = tuple(e.req_id for e in events if e.type.value == "queued") if events else ()
        finished = tuple((e.req_id, e.finish_reason or "") for e in events if e.type.value == "finished") \
            if events else ()
        preempted = tuple(so.preempted_req_ids) if so is not None else ()
        if so is not None and scheduled and not so.new_requests and not so.forked_requests \
                and so.total_num_scheduled_tokens == len(scheduled) and scheduled.keys() == previous.keys() \
                and (not self._in_prompt or self._in_prompt.isdisjoint(scheduled)):
            return StepView(step, when, scheduled, (), preempted, arrived, finished, num_outputs, True)
        prefill: list[RequestId] = []
        if so is not None:
            # a new (or resumed) request's first chunk, any chunk of more than one token, and a
            # one-token chunk before anything was sampled that does not reach the end of the
            # known tokens (the prompt's last token; under async scheduling a first decode
            # starts there) are prefill; the rest decode
            in_prompt = self._in_prompt
            for new in so.new_requests:
                prefill.append(new.req_id)
                if new.num_computed_tokens + scheduled[new.req_id] < len(new.token_ids):
                    in_prompt.add(new.req_id)
            for c in so.cached_requests:
                n = scheduled[c.req_id]
                if n > 1 or (c.last_token_id is None and c.num_computed_tokens < c.num_tokens):
                    prefill.append(c.req_id)
                    if c.num_computed_tokens + n < c.num_tokens:
                        in_prompt.add(c.req_id)
                        continue
                in_prompt.discard(c.req_id)
            prefill += [f.req_id for f in so.forked_requests if f.parent_req_id in prefill]
        return StepView(step, when, scheduled, tuple(prefill), preempted, arrived, finished, num_outputs)


def _request_view(request: Request, blocks) -> RequestView:
    cached = request.num_cached_tokens
    return RequestView(request.request_id, request.parent_id, len(request.prompt_token_ids),
                       len(request.output_token_ids), request.num_computed_tokens, cached if cached > 0 else 0,
                       request.max_tokens, request.num_preemptions, tuple([b.block_id for b in blocks]))
