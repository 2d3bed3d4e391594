"""Continuous batching under one rule: each request's num_computed_tokens catches up with
its num_tokens under a per-step token budget. Prefill, chunked prefill, decode, prefix-cache
hits and recompute after preemption all fall out of that rule. First come, first served;
preemption evicts the newest running request.

One exception keeps a long prompt from holding shorter work back: a prefill (or recompute)
with more than half the budget left leaves up to half of each step to the running requests
behind it and to the waiting prompts that need fewer tokens than it has left, which are then
admitted past the longer waiting ones (_yield_to_shorter). A running request behind it thus
still gets its decode step, and a short prompt its first token a step after it arrives rather
than after the long prompt's whole prefill.

Policy "priority" (vLLM's): the waiting and the running queue are kept in (priority, arrival)
order, lower priority values first, so the best request is admitted first, running requests
get the step's token budget in that order, and preemption evicts the worst (the lowest
priority, the latest arrival among equals). A waiting request never preempts a running one:
it is admitted ahead of every worse one as soon as a sequence slot and its blocks are free.

Preemption by swap (preemption_mode "swap", the default when a host tier exists): the
victim's blocks go to the host tier (KVCacheManager.swap_out) and it waits, at the head of
the queue, with its num_computed_tokens kept; resuming, it gets fresh device blocks that the
worker fills from the host while the step's forward runs (so it joins the batch a step
later, as a request with host prefix hits does), and they count as computed tokens. When the
host tier has no room the victim is recomputed, as in mode "recompute". Each step's copy
lists (blocks_to_swap_out, blocks_to_swap_in) travel in its SchedulerOutput.

Async scheduling (one step in flight, see EngineCore): the next step is scheduled before the
last one's sampled tokens are back. Each request counts what is scheduled but unresolved
(num_unresolved_tokens, num_inflight_samples); a step never schedules past max_tokens or
max_model_len counting the in-flight token, and never preempts a request with work in
flight (it schedules less instead; the next step, with that work resolved, may preempt).

Structured outputs (core/structured_output.py): a step names the constrained requests that
sample in it (structured_req_ids) and carries their token bitmask; update_from_output
advances their matchers by the sampled tokens. In lockstep the scheduler fills the bitmask
at once. Under async scheduling (`defer_grammar`, set by EngineCore) a constrained request
is scheduled with its last token still in flight, and the bitmask is filled later
(`deferred_grammar_bitmask`), once the step before it is sampled (the grammar process takes
that token from the device), while the device runs the step's forward pass; the runner
samples the step when the mask arrives.

Pipeline parallelism (`micro_batches` = PP > 1): up to PP steps are in flight, one per stage.
A request whose sampled token is in flight is not scheduled again (the first stage would wait
for the last one), so the steps in flight are disjoint micro-batches; each step takes at most
1/PP of the sequences that could run, so the next one finds requests left for it. Prompt
chunks, which need no sampled token, follow each other down the pipeline.

Decode windows (num_scheduler_steps > 1, core/decode_window.py): when nothing could join or
change before it ends, one schedule runs up to K decode steps of one token a row; each row
gets slots and in-flight samples for all the steps it runs.

Policy "static" (for the static-vs-continuous benchmark): a batch is admitted together and
no request joins until every request of the batch has finished.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from pagedserve.core import structured_output
from pagedserve.core.decode_window import plan_window
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.lora_slots import LoraSlots
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.runner_blocks import RunnerBlocks
from pagedserve.core.step_recovery import StepRecovery
from pagedserve.core.stop_rules import advance_grammar, check_stop
from pagedserve.engine_io import (ForkedRequestData, ModelRunnerOutput, NewRequestData, RequestId,
                                  SchedulerOutput)

logger = logging.getLogger(__name__)
_RUNNING = RequestStatus.RUNNING
POLICIES = ("continuous", "priority", "static")
YIELD_SCAN = 32   # waiting requests a long prefill's yield looks at (_yield_to_shorter)


def _queue_key(request: Request) -> tuple[int, int]:
    """Policy "priority": the order of both queues."""
    return request.priority, request.arrival_index


def _insert_in_order(queue: deque[Request] | list[Request], request: Request) -> None:
    """Into a queue kept in _queue_key order, after its equals."""
    queue.insert(bisect.bisect_right(queue, _queue_key(request), key=_queue_key), request)


@dataclass
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0   # cumulative
    num_batched_tokens: int = 0
    num_swapped: int = 0       # waiting requests whose blocks are in the host tier
    num_swap_preemptions: int = 0   # cumulative preemptions by swap (of num_preemptions)


@dataclass(frozen=True)
class Yielded:
    """A step's long prefill left part of its budget to the waiting prompts shorter than it."""
    shorter_than: int   # its tokens left: waiting prompts that need as many or more are passed over
    priority: int       # policy "priority": no waiting request worse than it joins with that budget


class Scheduler(StepRecovery):
    """Owns the request queues; mutated only from the engine thread."""

    def __init__(self, kv_cache_manager: KVCacheManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, policy: str = "continuous",
                 preemption_mode: str = "swap", max_loras: int = 0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if preemption_mode not in ("swap", "recompute"):
            raise ValueError(f"preemption_mode must be 'swap' or 'recompute', got {preemption_mode!r}")
        self.swap = preemption_mode == "swap" and kv_cache_manager.host is not None
        self.kv = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.policy = policy
        self.by_priority = policy == "priority"
        self._num_arrivals = 0
        self.requests: dict[RequestId, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.pending_forks: dict[RequestId, list[Request]] = {}
        self.runner_blocks = RunnerBlocks(kv_cache_manager)   # what the runner holds
        self._finished_since_last_step: set[RequestId] = set()
        self.num_constrained = 0         # live requests with a structured-outputs grammar
        # After a failed step: its requests, each scheduled alone until it samples a token
        # (EngineCore._fail); a suspect that fails alone is failed.
        self.suspects: set[RequestId] = set()
        self._requeued_since_last_step: set[RequestId] = set()
        self._constrained_samples: list[Request] = []   # this step's sampling rows with a grammar
        self.defer_grammar = False          # async scheduling: the engine fills the bitmask later
        self._deferred: tuple[list[Request], list[RequestId]] = ([], [])   # the deferred step's rows, ids
        self.grammars: Any = structured_output.InlineGrammars()   # EngineCore may pick ProcessGrammars
        self.stats = SchedulerStats()
        self.micro_batches = 1   # pipeline stages to keep busy (set by EngineCore)
        # decode steps one schedule may run (num_scheduler_steps; EngineCore sets it): decode_window.py
        self.num_scheduler_steps = 1
        self.lora_slots = LoraSlots(max_loras) if max_loras else None

    # ---- queue management -------------------------------------------------------------
    def add_request(self, request: Request, forks: list[Request] | None = None) -> None:
        """Queue a request; `forks` are its parallel-sampling siblings, forked from it once
        its prompt is computed."""
        self.requests[request.request_id] = request
        self._num_arrivals += 1
        request.arrival_index = self._num_arrivals
        self._enqueue(request)
        if request.grammar is not None:
            self.num_constrained += 1
            self.grammars.prepare(request)
        if forks:
            self.pending_forks[request.request_id] = forks
            for child in forks:
                self.requests[child.request_id] = child
                child.arrival_index = request.arrival_index
                if child.grammar is not None:
                    self.num_constrained += 1
                    self.grammars.prepare(child)

    def finish_requests(self, request_ids: list[RequestId], status: RequestStatus) -> list[Request]:
        """Finish (abort, stop-string stop, error) requests wherever they are; frees blocks.
        Unknown or already finished ids are ignored."""
        finished = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None or request.is_finished():
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
            request.status = status
            for child in self.pending_forks.pop(rid, []):
                child.status = status
                self._free(child)
                finished.append(child)
            self._free(request)
            finished.append(request)
        return finished

    def _enqueue(self, request: Request, front: bool = False) -> None:
        """Into the waiting queue: at its back (`front`: preempted or requeued, at its head), or
        under policy "priority" at its place in (priority, arrival) order."""
        if self.by_priority:
            _insert_in_order(self.waiting, request)
        elif front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def _add_running(self, request: Request) -> None:
        """Into the running queue: at its back, or under policy "priority" at its place in
        (priority, arrival) order (its tail is then the preemption victim)."""
        if self.by_priority:
            _insert_in_order(self.running, request)
        else:
            self.running.append(request)

    def uncache(self, request_ids: list[RequestId]) -> None:
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is not None:
                self.kv.uncache(request)

    def _free(self, request: Request) -> None:
        self.suspects.discard(request.request_id)
        if self.lora_slots is not None:
            self.lora_slots.release(request)
        self.kv.forget(request)
        if self.requests.pop(request.request_id, None) is not None:
            if request.grammar is not None:
                self.num_constrained -= 1
                self.grammars.release(request)
        if self.runner_blocks.forget(request.request_id):
            self._finished_since_last_step.add(request.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_since_last_step)
        self._finished_since_last_step = set()
        if self._requeued_since_last_step:   # the runner drops their state; they come back as new
            out.preempted_req_ids |= self._requeued_since_last_step
            self._requeued_since_last_step = set()
        isolate = bool(self.suspects)   # one suspect alone per step, nothing else
        scheduled: list[Request] = []
        max_seqs = self._max_seqs_per_step()
        if self.num_scheduler_steps > 1 and self._window_may_open():
            out.num_steps, out.window_row_steps = plan_window(
                self.running, self.num_scheduler_steps, self.kv.pool.num_free_blocks, self.kv.block_size,
                self.max_model_len, self.max_num_batched_tokens)
        budget, may_admit, yielded = self._schedule_running(out, scheduled, isolate, max_seqs)
        if may_admit:
            self._admit_waiting(out, scheduled, budget, isolate, max_seqs, yielded)
        if isolate and not scheduled:   # no suspect can run alone now (memory): stop isolating
            self.suspects.clear()
        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        self.stats.num_batched_tokens = out.total_num_scheduled_tokens
        if self.pending_forks:
            self._fork_completed_prompts(scheduled, out)
        if self.lora_slots is not None:
            out.lora_loads = self.lora_slots.take_loads()
        out.blocks_to_copy = self.kv.take_pending_copies()
        out.blocks_to_swap_out, out.blocks_to_swap_in, out.num_swap_out_behind = self.kv.take_swaps()
        if self._constrained_samples:
            self._name_constrained_rows(out)
        return out

    def _schedule_running(self, out: SchedulerOutput, scheduled: list[Request], isolate: bool, max_seqs: int
                          ) -> tuple[int, bool, Yielded | None]:
        """The running requests' tokens, in queue order, under the step's budget (preempting
        from the back of the queue when the pool is full); each one scheduled is appended to
        `scheduled`. Returns the budget left, whether waiting requests may be admitted (not
        after a preemption, nor when one was needed but its victim has work in flight) and
        whether a long prefill left part of the budget to shorter waiting prompts
        (`_yield_to_shorter`)."""
        budget, index, running = self.max_num_batched_tokens, 0, self.running
        half, reserved, yielded = budget // 2, 0, None
        steps, short = out.num_steps, out.window_row_steps
        # read once: this loop runs for every running request every step (host time a row)
        allocate_slots, describe, suspects = self.kv.allocate_slots, self._describe, self.suspects
        micro_batched, defer_grammar, max_model_len = self.micro_batches > 1, self.defer_grammar, self.max_model_len
        constrained, admit = self.num_constrained > 0, True
        while index < len(running) and budget > 0 and len(scheduled) < max_seqs:
            request = running[index]
            if isolate and (scheduled or request.request_id not in suspects):
                index += 1
                continue
            num_inflight = request.num_inflight_samples
            # lockstep filling: its mask needs the token in flight; under PP the first stage
            # would wait for it (PP never defers the grammar: EngineCore)
            if num_inflight and (micro_batched or constrained and request.grammar is not None and not defer_grammar):
                index += 1
                continue
            num_prompt = len(request.prompt_token_ids)
            num_known = num_prompt + len(request.output_token_ids)   # request.num_tokens
            num_tokens = num_known + num_inflight
            num_left = num_tokens - request.num_computed_tokens - request.num_unresolved_tokens
            num_new = min(num_left, budget)
            # a long prefill (or recompute) leaves up to half the budget to the shorter work behind it
            if num_left > half and not isolate and (self.waiting or index + 1 < len(running)):
                if yielded is None:   # the first: at least half of what is left, so it never stalls
                    yielded = Yielded(num_left, request.priority)
                    reserved = self._yield_to_shorter(yielded, half, index + 1)
                    num_new = min(num_new, max(budget - reserved, budget // 2))
                else:                 # another long one behind it takes what the shorter work leaves
                    num_new = min(num_new, budget - reserved)
            # skip if the token in flight ends the request by length: schedule nothing more
            if num_new <= 0 or (num_inflight and (num_tokens - num_prompt >= request.max_tokens
                                                  or num_tokens >= max_model_len)):
                index += 1
                continue
            row_steps = short.get(request.request_id, steps) if short else steps
            while not allocate_slots(request, num_new + row_steps - 1):
                victim = running[-1]
                if victim.num_unresolved_tokens:
                    return budget, False, None   # blocked: the next step, with that work resolved, may preempt
                running.pop()
                self._preempt(victim, out)
                admit = False
                if victim is request:
                    return budget, False, None
            describe(request, num_new, out, num_known, row_steps)
            scheduled.append(request)
            budget -= num_new
            index += 1
        return budget, admit, yielded if reserved else None

    def _yield_to_shorter(self, yielded: Yielded, most: int, behind: int) -> int:
        """Tokens a long prefill leaves this step to the work behind it that needs fewer than its
        `yielded.shorter_than` (at most `most`, half the budget): the running requests after it
        (from `behind`; a decode needs one) and the waiting that could be admitted (the first
        YIELD_SCAN). Without it a short request waits for a long prompt's whole prefill (8k
        tokens on a 2-core CPU: ~28 s) before its first token, and one admitted behind it gets
        no decode step until that prefill ends. Under policy "priority" nobody worse than the
        long prefill or than a longer waiting prompt ahead counts. 0 under policy "static" and
        pipeline parallelism (a step there is a micro-batch: the next one takes the rest)."""
        if self.policy == "static" or self.micro_batches > 1:
            return 0
        reserved, worst, by_priority = 0, yielded.priority, self.by_priority
        for row in itertools.islice(self.running, behind, None):
            if reserved >= most or by_priority and row.priority > worst:
                break
            need = row.num_tokens + row.num_inflight_samples - row.num_computed_tokens - row.num_unresolved_tokens
            if need < yielded.shorter_than:
                reserved += max(need, 0)
        num_seqs = self._num_running_seqs()
        for waiting, _ in zip(self.waiting, range(YIELD_SCAN)):
            if reserved >= most or num_seqs >= self.max_num_seqs or by_priority and waiting.priority > worst:
                break
            need = waiting.num_tokens - waiting.num_computed_tokens
            if need >= yielded.shorter_than:
                worst = min(worst, waiting.priority)   # it waits its turn; nobody worse passes it
                continue
            reserved += need
            num_seqs += 1 + len(self.pending_forks.get(waiting.request_id, ()))
        return min(reserved, most)

    def _admit_waiting(self, out: SchedulerOutput, scheduled: list[Request], budget: int, isolate: bool,
                       max_seqs: int, yielded: Yielded | None = None) -> None:
        """Waiting requests join, in queue order, while sequence slots, the budget and the pool
        allow (prefix-cache hits counted as computed); a static batch is formed in one step.
        `yielded`: a long prefill left budget to shorter prompts (_yield_to_shorter), so the
        waiting that need as many tokens or more are passed over (they keep their place at the
        head), and under policy "priority" none worse than it or than those passed over joins."""
        forming_static_batch = self.policy == "static" and not self.running
        if self.policy == "static" and not forming_static_batch:
            return
        if isolate and (scheduled or not self._suspect_first()):
            return
        # A static batch is formed in one step: its members join even past this step's token
        # budget (their prefill then proceeds in chunks), as long as their prompts fit the pool.
        reserve = self.kv.pool.num_free_blocks
        num_seqs = self._num_running_seqs()
        lora_slots, passed_over = self.lora_slots, []   # LoRA: waiting requests whose adapter finds no slot now
        worst = yielded.priority if yielded is not None else 0
        while self.waiting and num_seqs < self.max_num_seqs and len(scheduled) < max_seqs \
                and (budget > 0 or forming_static_batch):
            request = self.waiting[0]
            # parallel samples count: a parent joins only when all its sequences fit
            family = 1 + len(self.pending_forks.get(request.request_id, ()))
            if num_seqs + family > self.max_num_seqs:
                break
            if yielded is not None:   # a long prefill left this budget to shorter prompts
                if self.by_priority and request.priority > worst or len(passed_over) >= YIELD_SCAN:
                    break
                if request.num_tokens - request.num_computed_tokens >= yielded.shorter_than:
                    worst = min(worst, request.priority)   # it waits its turn; nobody worse passes it
                    passed_over.append(self.waiting.popleft())
                    continue
            if lora_slots is not None and not lora_slots.acquire(request):
                passed_over.append(self.waiting.popleft())
                continue
            if forming_static_batch:
                reserve -= self.kv.blocks_needed(request.num_tokens + 1)
                if reserve < 0 and self.running:
                    break
            hits, num_hit_tokens = [], 0
            if request.num_computed_tokens == 0 and request.sampling_params.prompt_logprobs is None:
                hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - request.num_computed_tokens - num_hit_tokens, budget)
            if not self.kv.allocate_slots(request, num_new, hits):
                if lora_slots is not None:
                    lora_slots.release(request)
                break
            if self.kv.is_loading(request):   # it runs next step, after its blocks are copied in
                num_new = 0
            self.waiting.popleft()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            request.num_computed_tokens += num_hit_tokens
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self._add_running(request)
            num_seqs += family
            if num_new > 0:
                self._describe(request, num_new, out)
                scheduled.append(request)
                budget -= num_new
            if isolate:
                break
        self.waiting.extendleft(reversed(passed_over))   # at the head again, in their order

    def _window_may_open(self) -> bool:
        """Nothing that one step a schedule would act on can happen inside a decode window
        (core/decode_window.py): nothing waits that could join, no grammar, fork, suspect or
        pipeline micro-batches."""
        return not ((self.waiting and self._num_running_seqs() < self.max_num_seqs) or self.suspects
                    or self.num_constrained or self.pending_forks or self.micro_batches > 1)

    def _max_seqs_per_step(self) -> int:
        """Under PP, 1/micro_batches of the sequences that could run (at least 1); a static
        batch still forms in one step."""
        if self.micro_batches == 1 or self.policy == "static":
            return self.max_num_seqs
        could_run = min(len(self.running) + len(self.waiting), self.max_num_seqs)
        return max(1, -(-could_run // self.micro_batches))

    def _name_constrained_rows(self, out: SchedulerOutput) -> None:
        """The step's sampling rows with a grammar, and their bitmask (later, if deferred)."""
        constrained = [r for r in self._constrained_samples if r.request_id in out.num_scheduled_tokens]
        self._constrained_samples = []
        if constrained:
            out.structured_req_ids = [r.request_id for r in constrained]
            if not self.defer_grammar:
                out.grammar_bitmask = self.grammars.fill(constrained)
        if self.defer_grammar:
            self._deferred = constrained, out.structured_req_ids

    def deferred_grammar_bitmask(self, sampled: SchedulerOutput | None = None, rows: list[int] = ()
                                 ) -> structured_output.PendingFill | None:
        """The bitmask of the last step scheduled with `defer_grammar`, on its way (None if it
        has no constrained rows and nothing else is posted): the engine calls this as soon as
        the step before it is sampled, `sampled`, whose constrained rows' tokens land in row
        rows[i] of the grammars' sampled ids (ProcessGrammars takes those of the requests
        still running from there; update_from_output, after this call, decides what they
        end), and takes the result right before it samples the step."""
        (rows_, ids), self._deferred = self._deferred, ([], [])
        if sampled is None:
            return self.grammars.start_fill(rows_, ids) if rows_ else None   # (a plain step: nothing)
        return self.grammars.start_fill(rows_, ids, sampled.structured_req_ids, rows, self.requests)

    def _suspect_first(self) -> bool:
        """Move the first waiting suspect to the head of the queue; False if none waits."""
        suspect = next((r for r in self.waiting if r.request_id in self.suspects), None)
        if suspect is None:
            return False
        self.waiting.remove(suspect)
        self.waiting.appendleft(suspect)
        return True

    def _num_running_seqs(self) -> int:
        """Running sequences plus the forks reserved for running parents."""
        reserved = sum(len(forks) for rid, forks in self.pending_forks.items()
                       if rid in self.requests and self.requests[rid].status == _RUNNING)
        return len(self.running) + reserved

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        assert not request.num_unresolved_tokens, "a request with work in flight is never preempted"
        if self.kv.preempt(request, swap=self.swap):   # swapped: it keeps its computed tokens
            self.stats.num_swap_preemptions += 1
        else:
            request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        if self.lora_slots is not None:
            self.lora_slots.release(request)
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        self._enqueue(request, front=True)
        if self.runner_blocks.forget(request.request_id):
            out.preempted_req_ids.add(request.request_id)
        out.num_scheduled_tokens.pop(request.request_id, None)
        logger.debug("preempted %s", request.request_id)

    def _describe(self, request: Request, num_new: int, out: SchedulerOutput, num_tokens: int | None = None,
                  steps: int = 1) -> None:
        """Schedule `num_new` tokens of `request` (its blocks are final for this step): tell
        the runner (in full, or what changed: RunnerBlocks), then count the work as in flight
        until update_from_output. `num_tokens`: request.num_tokens if the caller has it.
        `steps` > 1 (a decode window, decode_window.py): one token a step, each step's sample in flight."""
        out.num_scheduled_tokens[request.request_id] = num_new
        num_ahead = request.num_computed_tokens + request.num_unresolved_tokens
        if num_tokens is None:
            num_tokens = len(request.prompt_token_ids) + len(request.output_token_ids)
        data = self.runner_blocks.describe(request, num_ahead, num_tokens)
        (out.new_requests if isinstance(data, NewRequestData) else out.cached_requests).append(data)
        request.num_unresolved_tokens += num_new * steps
        if num_ahead + num_new >= num_tokens + request.num_inflight_samples:
            request.num_inflight_samples += steps
            if request.grammar is not None:
                self._constrained_samples.append(request)

    def _fork_completed_prompts(self, scheduled: list[Request], out: SchedulerOutput) -> None:
        """n > 1: siblings join when the parent's prompt completes; they share its blocks and
        sample from its logits in this very step."""
        for parent in scheduled:
            forks = self.pending_forks.get(parent.request_id)
            if not forks or parent.num_scheduled_tokens_ahead < parent.num_tokens:
                continue
            del self.pending_forks[parent.request_id]
            for child in forks:
                self.kv.fork(parent, child)
                if self.lora_slots is not None:
                    self.lora_slots.acquire(child)   # the parent holds the adapter's slot: it never fails
                child.num_computed_tokens = parent.num_computed_tokens
                child.num_unresolved_tokens = parent.num_unresolved_tokens   # in flight, as the parent's
                child.num_inflight_samples = parent.num_inflight_samples
                child.num_cached_tokens = parent.num_cached_tokens
                child.first_scheduled_time = parent.first_scheduled_time
                child.status = RequestStatus.RUNNING
                self._add_running(child)
                if child.grammar is not None:
                    self._constrained_samples.append(child)
                self.runner_blocks.mark_known(child.request_id)
                out.forked_requests.append(ForkedRequestData(child.request_id, parent.request_id,
                                                             child.sampling_params))
                out.num_scheduled_tokens[child.request_id] = out.num_scheduled_tokens[parent.request_id]

    def update_from_output(self, out: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[Request]:
        """Advance counters, append sampled tokens, apply token-level stop rules.
        Returns the requests that got a new token or finished this step."""
        changed = []
        requests, sampled = self.requests, runner_output.sampled_token_ids
        suspects, constrained = self.suspects, self.num_constrained > 0
        stop_tokens = self.grammars.stop_tokens   # None: the grammars see every token
        for rid, num_new in out.num_scheduled_tokens.items():
            request = requests.get(rid)
            if request is None or request.status != _RUNNING:
                continue   # finished (or aborted) while the step was in flight
            request.num_computed_tokens += num_new
            request.num_unresolved_tokens -= num_new
            token = sampled.get(rid)
            if token is None:
                continue
            request.num_inflight_samples -= 1
            request.output_token_ids.append(token)
            if suspects and rid in suspects:   # it ran a whole step alone: cleared
                suspects.discard(rid)
                request.num_step_failures = 0
            if ((constrained and request.grammar is not None and (stop_tokens is None or token in stop_tokens)
                    and advance_grammar(self.grammars, request, token))
                    or check_stop(request, token, self.max_model_len)):
                self.running.remove(request)
                self._free(request)
            changed.append(request)
        self.stats.num_running = len(self.running)
        self.stats.num_waiting = len(self.waiting)
        self.stats.kv_cache_usage = self.kv.usage()
        self.stats.num_swapped = len(self.kv.req_to_host_blocks)
        return changed
