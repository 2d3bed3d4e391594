"""Structured outputs, the core half: one xgrammar matcher per constrained sequence (parallel
samples each have their own) and the step's token bitmask, on one of two backends:

- InlineGrammars: the matchers live on the engine thread (`request.grammar_matcher`). Lockstep
  and pipeline parallelism fill at schedule time (`fill`); async fills when the engine asks.
- ProcessGrammars (async scheduling, the default there): the matchers live in a grammar
  process (core/grammar_process.py). A deferred step is sampled with its ids copied into the
  process's segment (`sampled_ids`); right after, `start_fill` posts where each constrained
  row's token lands and the next step's rows, and the process accepts each token as the
  device's copy lands and fills, while the engine thread launches the next forward, waits,
  hands the outputs over and schedules; `PendingFill.result()` waits for the mask just
  before sampling. `accept` (in update_from_output) only decides termination, from the
  grammar's stop tokens (a masked sample is a stop token only where the grammar may end).
  A token the grammar refuses (masking makes that impossible unless something is broken)
  is learned at the next result(), one step late: `PendingFill.failed`, which the engine
  fails (finish_reason "abort", the error naming the token); that request's next token is
  dropped. A step that fails after its tokens were posted has them rolled back
  (`take_back`: its requests are recomputed). If the process dies, the step that waited
  for it fails (EngineCore._fail), the next fill starts a new process, and the requests
  whose matchers died with the old one fail then.

The bitmask: one int32 CPU tensor [rows, ceil(vocab / 32)] (row i for rows[i]), the first
rows of a buffer reused from step to step (a step's mask is consumed, copied to the device
or applied, before the next one is filled). A finished request's row (a deferred fill's
request that ended meanwhile) is all-allowed. `accept` advances a matcher by a sampled
token, once per token: tokens recomputed after preemption are never accepted again.
"""
from __future__ import annotations

import logging
from typing import Any

from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.stop_rules import REFUSED_PARAM, admits_nothing, mask_failure, refusal

logger = logging.getLogger(__name__)
_RUNNING = RequestStatus.RUNNING


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
    requests to fail, with why and the parameter to blame if it was their own doing
    (ProcessGrammars only: a token their grammar refused, or their matcher lost with a
    grammar process that died)."""

    def __init__(self, result: Any) -> None:
        self._result = result
        self.failed: list[tuple[Request, str, str | None]] = []

    def result(self) -> Any:
        return self._result()


class InlineGrammars:
    """The matchers on the engine thread."""

    stop_tokens = None   # every sampled token goes to accept()

    def __init__(self) -> None:
        self._buffer: Any = None

    def prepare(self, request: Request) -> None:
        pass

    def accept(self, request: Request, token: int) -> tuple[bool, bool]:
        return accept(request, token)

    def refused_by_request(self, request: Request) -> bool:
        """After its matcher refused a token: whether the request had nothing to sample."""
        return admits_nothing(request.grammar_matcher, request.grammar.tokenizer_info.vocab_size)

    def sampled_ids(self) -> None:
        return None   # the runner's own copy

    def release(self, request: Request) -> None:
        pass

    def take_back(self, requests: list[Request]) -> None:
        pass   # nothing was accepted ahead of the update

    def fill(self, rows: list[Request]) -> Any:
        self._buffer = bitmask_buffer(rows, self._buffer)
        return fill_bitmask(rows, self._buffer)

    def start_fill(self, rows: list[Request], row_ids: list[str], *sampled) -> PendingFill | None:
        """Filled at result(): the engine takes it right before sampling (the sampled step's
        tokens: taken in update_from_output instead)."""
        return PendingFill(lambda: self.fill(rows)) if rows else None

    def drop(self, pending: PendingFill) -> None:
        pass   # nothing was started

    def shutdown(self) -> None:
        pass


class ProcessGrammars:
    """The matchers in a grammar process (core/grammar_process.py), started at the first
    constrained request. One slot per live constrained sequence (kept across preemption);
    grammars are sent once per distinct CompiledGrammar object (the frontend hands out one
    object per distinct constraint) and dropped when unused while more than MAX_IDLE_GRAMMARS
    are known. `max_rows`: the most rows a step samples (max_num_seqs).

    The tokens come from the device: a deferred step is sampled with its ids copied into the
    process's segment (`sampled_ids`), and `start_fill` names each constrained row's ids row
    at once, so the process accepts as soon as the copy lands."""

    MAX_IDLE_GRAMMARS = 64

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max(max_rows, 1)
        # every prepared grammar's stop tokens: accept() can end a request only on one of
        # these, so the scheduler calls it for those tokens alone (not once per row and step)
        self.stop_tokens: frozenset[int] = frozenset()
        self.process: Any = None
        self._slots: dict[str, int] = {}          # request id -> slot
        self._free_slots: list[int] = []
        self._num_slots = 0
        self._grammars: dict[int, list] = {}      # id(grammar) -> [grammar, key, stop ids, live slots]
        self._slot_grammar: dict[int, int] = {}   # slot -> id(grammar)
        self._next_key = 0
        self._lost: set[str] = set()   # request ids whose matcher died with a process
        self._unreported: list[tuple[Request, str, str | None]] = []   # failures of a step nobody took the mask of
        self._epoch = 0   # bumped when a slot is released or rolled back: the last post's slots may not serve again
        self._last: tuple = ([], [], [], -1)   # the last post's fills: row ids, rows, slots, epoch

    def prepare(self, request: Request) -> None:
        """A constrained request arrived: the process starts now (its imports take ~2 s) so
        that it is ready by the request's first sampled token."""
        stop_ids = request.grammar.tokenizer_info.stop_token_ids
        if not self.stop_tokens.issuperset(stop_ids):
            self.stop_tokens = self.stop_tokens.union(stop_ids)
        if self.process is None:
            from pagedserve.core.grammar_process import GrammarProcess
            grammar = request.grammar
            self.process = GrammarProcess(grammar.tokenizer_info, self.max_rows, bitmask_width(grammar))

    def sampled_ids(self) -> Any:
        """Where the runner copies a deferred step's sampled ids (the process reads them there)."""
        return self.process.sampled_ids() if self.process is not None and self.process.alive else None

    def accept(self, request: Request, token: int) -> tuple[bool, bool]:
        """The process took `token` already (start_fill); terminated if it is one of the
        grammar's stop tokens. A refusal is learned at the next PendingFill.result()."""
        entry = self._grammars.get(id(request.grammar))
        stop_ids = entry[2] if entry is not None else request.grammar.tokenizer_info.stop_token_ids
        return True, token in stop_ids

    def release(self, request: Request) -> None:
        self._lost.discard(request.request_id)
        slot = self._slots.pop(request.request_id, None)
        if slot is None:
            return
        self._epoch += 1
        self.process.close(slot)
        self._free_slots.append(slot)
        entry = self._grammars[self._slot_grammar.pop(slot)]
        entry[3] -= 1
        if len(self._grammars) > self.MAX_IDLE_GRAMMARS:
            for gid, (_, key, _, live) in list(self._grammars.items()):
                if not live:
                    self.process.drop_grammar(key)
                    del self._grammars[gid]

    def take_back(self, requests: list[Request]) -> None:
        """These requests' matchers took a token that will not be applied (its step failed
        after the post; they are recomputed): each is rolled back by one token."""
        for request in requests:
            slot = self._slots.get(request.request_id)
            if slot is not None:
                self.process.rollback(slot)
        self._epoch += 1

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

    def start_fill(self, rows: list[Request], row_ids: list[str], sampled_ids: list[str] | None = None,
                   sampled_rows: list[int] = (), requests: dict | None = None) -> PendingFill | None:
        """Post the fill of `rows` (ids `row_ids`) and the tokens of the step just sampled:
        its constrained requests `sampled_ids` (the fills of the last post), whose tokens land
        in rows `sampled_rows` of sampled_ids() (those still running, looked up in
        `requests`, take them); the process works until result(). None if there is nothing
        to post. In a steady decode (the same rows step after step, no slot released since)
        nothing is looked up per row: the last post's slots serve again."""
        if self.process is not None and not self.process.alive:
            self._restart()
            sampled_ids = None   # the new process has no matchers for them (they are lost)
        if not rows and not sampled_ids:
            return None
        failed, self._unreported = self._unreported, []
        if rows:
            self.prepare(rows[0])
        last_ids, last_rows, last_fills, last_epoch = self._last
        steady = last_epoch == self._epoch and -1 not in last_fills
        posted, accept_slots, accept_rows = [], [], []
        if sampled_ids:
            if steady and sampled_ids is last_ids and -1 not in sampled_rows:
                posted, accept_slots, accept_rows = last_rows, last_fills, sampled_rows
            else:
                slots = self._slots
                for rid, row in zip(sampled_ids, sampled_rows):
                    request, slot = requests.get(rid), slots.get(rid)
                    if row >= 0 and slot is not None and request is not None and request.status == _RUNNING:
                        posted.append(request)
                        accept_slots.append(slot)
                        accept_rows.append(row)
        if steady and row_ids == last_ids:
            fills, written = last_fills, True   # already in the segment
        else:
            fills, written = self._fills(rows, failed), False
        self.process.post(accept_slots, accept_rows, fills, fills_written=written)
        self._last = (row_ids, rows, fills, self._epoch)
        pending = PendingFill(lambda: self._collect(posted, pending.failed))
        pending.failed = failed
        return pending

    def _fills(self, rows: list[Request], failed: list[tuple[Request, str, str | None]]) -> list[int]:
        """The slot of each row (opened if new; -1: finished, or lost, which fails it)."""
        slots, lost = self._slots, self._lost
        fills = []
        for request in rows:
            slot = slots.get(request.request_id)
            if request.is_finished():
                fills.append(-1)
            elif lost and request.request_id in lost:
                fills.append(-1)
                failed.append((request, "its grammar matcher was lost: the grammar process died", None))
            else:
                fills.append(self._open(request) if slot is None else slot)
        return fills

    def drop(self, pending: PendingFill) -> None:
        """A posted fill whose step was not launched: its result is taken (its failures are
        reported with the next post's)."""
        try:
            pending.result()
        except Exception:
            return   # the process died: the next post restarts it
        self._unreported += pending.failed

    def _restart(self) -> None:
        """The process died: forget it; its sequences' matchers are lost (they fail at their
        next fill); the next one starts afresh."""
        logger.error("the grammar process died (%s); starting another", self.process.popen.returncode)
        self._lost |= set(self._slots)
        self.process.shutdown()
        self.process = None
        self._slots, self._free_slots, self._num_slots = {}, [], 0
        self._grammars, self._slot_grammar = {}, {}
        self._epoch += 1

    def _collect(self, posted: list[Request], failed: list[tuple[Request, str, str | None]]) -> Any:
        mask, accepted = self.process.wait()
        if not (accepted == 1).all():   # 0: refused, -1: refused with nothing to sample (the request's own)
            ids = self.process.layout.ids
            rows = self.process.layout.accept_row
            failed += [(request, refusal(int(ids[rows[i]])), REFUSED_PARAM) if ok == -1 else
                       (request, mask_failure(int(ids[rows[i]])), None)
                       for i, (request, ok) in enumerate(zip(posted, accepted.tolist())) if ok != 1]
        return mask

    def shutdown(self) -> None:
        if self.process is not None:
            self.process.shutdown()
