"""Structured outputs, the core half: one xgrammar matcher per constrained sequence (parallel
samples each have their own) and the step's token bitmask, on one of two backends:

- InlineGrammars: the matchers live on the engine thread (`request.grammar_matcher`). Lockstep
  and pipeline parallelism fill at schedule time (`fill`); async fills when the engine asks.
- ProcessGrammars (async scheduling, the default there): the matchers live in a grammar
  process (core/grammar_process.py). `accept` only queues the token and decides termination
  at once from the grammar's stop tokens (a masked sample is a stop token only where the
  grammar may end); `start_fill` posts the queued tokens and the step's rows, and the process
  accepts and fills while the engine thread hands the outputs over and schedules the next
  step; `PendingFill.result()` waits for the mask just before sampling. A token the grammar
  refuses (masking makes that impossible unless something is broken) is learned there, one
  step late: `PendingFill.rejected`, which the engine fails (finish_reason "abort", the
  error naming the token); that request's next token is dropped. If the process dies, the
  step that waited for it fails (EngineCore._fail), the next fill starts a new process, and
  the requests whose matchers died with the old one fail then.

The bitmask: one int32 CPU tensor [rows, ceil(vocab / 32)] (row i for rows[i]), the first
rows of a buffer reused from step to step (a step's mask is consumed, copied to the device
or applied, before the next one is filled). A finished request's row (a deferred fill's
request that ended meanwhile) is all-allowed. `accept` advances a matcher by a sampled
token, once per token: tokens recomputed after preemption are never accepted again.
"""
from __future__ import annotations

import logging
from typing import Any

from pagedserve.core.request import Request

logger = logging.getLogger(__name__)


def _matcher(request: Request) -> Any:
    matcher = request.grammar_matcher
    if matcher is None:
        import xgrammar
        matcher = request.grammar_matcher = xgrammar.GrammarMatcher(request.grammar)
    return matcher


def _batch_matcher() -> Any:
    """xgrammar's batch calls without a thread pool (on an H200 host the pool saved fill time
    in isolation and lost far more end to end: benchmarks/RESULTS.md, issue 20); one per call
    (~3 us), so engines on different threads share nothing."""
    import xgrammar
    return xgrammar.BatchGrammarMatcher(max_threads=1)


def bitmask_width(grammar: Any) -> int:
    import xgrammar
    return xgrammar.get_bitmask_shape(1, grammar.tokenizer_info.vocab_size)[1]


def bitmask_buffer(requests: list[Request], buffer: Any = None) -> Any:
    """`buffer` if it has the rows and width for these requests' bitmask, else a new one. A
    fresh tensor per step cost more than filling 64 rows (page faults)."""
    import xgrammar
    vocab_size = requests[0].grammar.tokenizer_info.vocab_size
    width = bitmask_width(requests[0].grammar)
    if buffer is None or buffer.shape[0] < len(requests) or buffer.shape[1] != width:
        buffer = xgrammar.allocate_token_bitmask(max(len(requests), 64), vocab_size)
    return buffer


def fill_bitmask(requests: list[Request], buffer: Any) -> Any:
    """The token bitmask of these requests' next tokens (row i: requests[i]) in the first rows
    of `buffer` (bitmask_buffer), in one xgrammar call (each xgrammar call drops and retakes
    the GIL through tvm_ffi). A finished request's row (its matcher may have terminated,
    which xgrammar refuses to fill) is all-allowed."""
    bitmask = buffer[:len(requests)]
    matchers, indices = [], []
    for row, request in enumerate(requests):
        if request.is_finished():
            bitmask[row].fill_(-1)
        else:
            matchers.append(_matcher(request))
            indices.append(row)
    _batch_matcher().batch_fill_next_token_bitmask(matchers, bitmask, indices)
    return bitmask


def accept(request: Request, token: int) -> tuple[bool, bool]:
    """Advance the request's matcher by `token`: (accepted, terminated). Terminated: the
    grammar is complete and its stop token was accepted. One call per row: xgrammar's
    batch_accept_token does the same work in C++ (accept_token itself is the cost, ~2 us) and
    reading each element of its result costs more than is_terminated (benchmarks/grammar_fill.py)."""
    matcher = _matcher(request)
    if not matcher.accept_token(token):
        return False, matcher.is_terminated()
    return True, matcher.is_terminated()


class PendingFill:
    """A step's bitmask on its way: `result()` (once) returns it; `failed` then lists the
    requests to fail, with why (ProcessGrammars only: a token their grammar refused, or their
    matcher lost with a grammar process that died)."""

    def __init__(self, result: Any) -> None:
        self._result = result
        self.failed: list[tuple[Request, str]] = []

    def result(self) -> Any:
        return self._result()


class InlineGrammars:
    """The matchers on the engine thread."""

    def __init__(self) -> None:
        self._buffer: Any = None

    def prepare(self, request: Request) -> None:
        pass

    def accept(self, request: Request, token: int) -> tuple[bool, bool]:
        return accept(request, token)

    def take_ahead(self, request: Request, token: int) -> None:
        pass   # accepted in update_from_output

    def release(self, request: Request) -> None:
        pass

    def fill(self, rows: list[Request]) -> Any:
        self._buffer = bitmask_buffer(rows, self._buffer)
        return fill_bitmask(rows, self._buffer)

    def start_fill(self, rows: list[Request]) -> PendingFill:
        """Filled at result(): the engine takes it right before sampling."""
        return PendingFill(lambda: self.fill(rows))

    def shutdown(self) -> None:
        pass


class ProcessGrammars:
    """The matchers in a grammar process (core/grammar_process.py), started at the first
    constrained request. One slot per live constrained sequence (kept across preemption);
    grammars are sent once per distinct CompiledGrammar object (the frontend hands out one
    object per distinct constraint) and dropped when unused while more than MAX_IDLE_GRAMMARS
    are known. `max_rows`: the most rows a step samples (max_num_seqs); `fill_threads`: the
    process's fill pool."""

    MAX_IDLE_GRAMMARS = 64

    def __init__(self, max_rows: int, fill_threads: int = 1) -> None:
        self.max_rows = max(max_rows, 1)
        self.fill_threads = fill_threads
        self.process: Any = None
        self._slots: dict[str, int] = {}          # request id -> slot
        self._free_slots: list[int] = []
        self._num_slots = 0
        self._grammars: dict[int, list] = {}      # id(grammar) -> [grammar, key, stop ids, live slots]
        self._slot_grammar: dict[int, int] = {}   # slot -> id(grammar)
        self._next_key = 0
        self._accepts: list[tuple[Request, int, int]] = []   # (request, slot, token), not yet posted
        self._lost: set[str] = set()   # request ids whose matcher died with a process
        self._ahead: set[str] = set()   # request ids whose next accept() was taken ahead

    def prepare(self, request: Request) -> None:
        """A constrained request arrived: the process starts now (its imports take ~2 s) so
        that it is ready by the request's first sampled token."""
        if self.process is None:
            from pagedserve.core.grammar_process import GrammarProcess
            grammar = request.grammar
            self.process = GrammarProcess(grammar.tokenizer_info, self.max_rows, bitmask_width(grammar),
                                          self.fill_threads)

    def take_ahead(self, request: Request, token: int) -> None:
        """`token`, sampled for `request`, is queued now, before its step's update (whose
        accept() then only decides termination): the process accepts it during that update."""
        slot = self._slots.get(request.request_id)
        if slot is not None:
            self._accepts.append((request, slot, token))
            self._ahead.add(request.request_id)

    def accept(self, request: Request, token: int) -> tuple[bool, bool]:
        """Queued for the next post (unless taken ahead); terminated if `token` is one of the
        grammar's stop tokens."""
        rid = request.request_id
        if self._ahead and rid in self._ahead:
            self._ahead.discard(rid)
        else:
            slot = self._slots.get(rid)
            if slot is not None:
                self._accepts.append((request, slot, token))
        entry = self._grammars.get(id(request.grammar))
        stop_ids = entry[2] if entry is not None else request.grammar.tokenizer_info.stop_token_ids
        return True, token in stop_ids

    def release(self, request: Request) -> None:
        self._lost.discard(request.request_id)
        self._ahead.discard(request.request_id)
        slot = self._slots.pop(request.request_id, None)
        if slot is None:
            return
        self.process.close(slot)
        self._free_slots.append(slot)
        entry = self._grammars[self._slot_grammar.pop(slot)]
        entry[3] -= 1
        if len(self._grammars) > self.MAX_IDLE_GRAMMARS:
            for gid, (_, key, _, live) in list(self._grammars.items()):
                if not live:
                    self.process.drop_grammar(key)
                    del self._grammars[gid]

    def _open(self, request: Request) -> int:
        grammar = request.grammar
        entry = self._grammars.get(id(grammar))
        if entry is None:
            key, self._next_key = self._next_key, self._next_key + 1
            stop_ids = frozenset(grammar.tokenizer_info.stop_token_ids)
            entry = self._grammars[id(grammar)] = [grammar, key, stop_ids, 0]
            self.process.add_grammar(key, grammar)
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot, self._num_slots = self._num_slots, self._num_slots + 1
        entry[3] += 1
        self._slots[request.request_id] = slot
        self._slot_grammar[slot] = id(grammar)
        self.process.open(slot, entry[1])
        return slot

    def start_fill(self, rows: list[Request]) -> PendingFill:
        """Post the tokens taken since the last post and these rows' fill; the process works
        until result()."""
        failed: list[tuple[Request, str]] = []
        if self.process is not None and not self.process.alive:
            self._restart()
        self.prepare(rows[0])
        slots, lost = self._slots, self._lost
        fills = []
        for request in rows:
            if request.is_finished():
                fills.append(-1)
            elif lost and request.request_id in lost:
                fills.append(-1)
                failed.append((request, "its grammar matcher was lost: the grammar process died"))
            else:
                slot = slots.get(request.request_id)
                fills.append(self._open(request) if slot is None else slot)
        accepts, self._accepts = self._accepts, []
        while len(accepts) > self.max_rows:   # more than a step's worth (steps resolved together)
            chunk, accepts = accepts[:self.max_rows], accepts[self.max_rows:]
            self._post(chunk, [])
            self._collect(chunk, failed)
        self._post(accepts, fills)
        pending = PendingFill(lambda: self._collect(accepts, pending.failed))
        pending.failed = failed
        return pending

    def _restart(self) -> None:
        """The process died: forget it; its sequences' matchers are lost (they fail at their
        next fill); the next one starts afresh."""
        logger.error("the grammar process died (%s); starting another", self.process.popen.returncode)
        self._lost |= set(self._slots)
        self.process.shutdown()
        self.process = None
        self._slots, self._free_slots, self._num_slots = {}, [], 0
        self._grammars, self._slot_grammar, self._accepts, self._ahead = {}, {}, [], set()

    def _post(self, accepts: list[tuple[Request, int, int]], fills: list[int]) -> None:
        self.process.post([a[1] for a in accepts], [a[2] for a in accepts], fills)

    def _collect(self, accepts: list[tuple[Request, int, int]], failed: list[tuple[Request, str]]) -> Any:
        mask, accepted = self.process.wait()
        if not accepted.all():
            failed += [(request, f"sampled token {token} does not match the request's structured_outputs grammar")
                       for (request, _, token), ok in zip(accepts, accepted) if not ok]
        return mask

    def shutdown(self) -> None:
        if self.process is not None:
            self.process.shutdown()
