"""Structured outputs, the core half: one xgrammar GrammarMatcher per constrained sequence
(parallel samples each have their own) and the step's token bitmask.

The scheduler fills the token bitmask of the constrained requests that sample in a step:
one int32 CPU tensor [rows, ceil(vocab / 32)] (row i for requests[i], the first rows of a
buffer the scheduler reuses) goes to the worker on the SchedulerOutput, which applies it to
those rows' logits. With async scheduling the mask is filled after the previous step's
tokens are applied, on the grammar thread (`fill_async`), while the engine thread hands the
outputs to the frontend and schedules the next step (scheduler.py, engine_core.py).
`accept` advances a matcher by a sampled token, once per token: tokens recomputed after
preemption are never accepted again (the matcher keeps its state).

xgrammar's calls go through tvm_ffi, which releases the GIL for the length of each call, so
a fill on the grammar thread runs beside the engine thread's Python; each call is one batch
call, since every return must take the GIL back.
"""
from __future__ import annotations

import _thread
import functools
import queue
import threading
from typing import Any

from pagedserve.core.request import Request


def _matcher(request: Request) -> Any:
    matcher = request.grammar_matcher
    if matcher is None:
        import xgrammar
        matcher = request.grammar_matcher = xgrammar.GrammarMatcher(request.grammar)
    return matcher


@functools.cache
def _batch_matcher() -> Any:
    """xgrammar's batch calls on one thread: its thread pool cost more than it saved on an
    H200 box (11.7k vs 19.6k tok/s, benchmarks/RESULTS.md), and the fill now runs beside the
    engine thread, which needs the other core."""
    import xgrammar
    return xgrammar.BatchGrammarMatcher(max_threads=1)


def bitmask_buffer(requests: list[Request], buffer: Any = None) -> Any:
    """`buffer` if it has the rows and width for these requests' bitmask, else a new one. A
    fresh tensor per step cost more than filling 64 rows (page faults)."""
    import xgrammar
    vocab_size = requests[0].grammar.tokenizer_info.vocab_size
    width = xgrammar.get_bitmask_shape(1, vocab_size)[1]
    if buffer is None or buffer.shape[0] < len(requests) or buffer.shape[1] != width:
        buffer = xgrammar.allocate_token_bitmask(max(len(requests), 64), vocab_size)
    return buffer


class PendingFill:
    """A bitmask being filled on the grammar thread; `result()` waits for it (or raises what
    the fill raised). The rows' matchers must not be advanced until then."""

    def __init__(self, matchers: list[Any], bitmask: Any, indices: list[int]) -> None:
        self.matchers, self.bitmask, self.indices = matchers, bitmask, indices
        self.error: BaseException | None = None
        self.started, self.done = _thread.allocate_lock(), _thread.allocate_lock()
        self.started.acquire()
        self.done.acquire()

    def run(self) -> None:   # on the grammar thread
        self.started.release()
        try:
            _batch_matcher().batch_fill_next_token_bitmask(self.matchers, self.bitmask, self.indices)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.release()

    def result(self) -> Any:
        self.done.acquire()
        self.done.release()
        if self.error is not None:
            raise self.error
        return self.bitmask


class _GrammarThread:
    """One daemon thread per process runs the fills (one at a time; an engine has at most
    one in flight)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[PendingFill] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="pagedserve-grammar", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            self.jobs.get().run()


_grammar_thread: _GrammarThread | None = None
_start_lock = threading.Lock()


def _prepare(requests: list[Request], buffer: Any) -> PendingFill:
    """The fill of these requests' rows of `buffer`: a finished request's row (its token is
    dropped; its matcher may have terminated, and xgrammar fills none for a terminated
    matcher) is all-allowed now, the others are for the batch call."""
    bitmask = buffer[:len(requests)]
    matchers, indices = [], []
    for row, request in enumerate(requests):
        if request.is_finished():
            bitmask[row].fill_(-1)
        else:
            matchers.append(_matcher(request))
            indices.append(row)
    return PendingFill(matchers, bitmask, indices)


def fill_bitmask(requests: list[Request], buffer: Any) -> Any:
    """The token bitmask of these requests' next tokens (row i: requests[i]) in the first rows
    of `buffer` (bitmask_buffer), filled now on this thread."""
    fill = _prepare(requests, buffer)
    fill.run()
    return fill.result()


def fill_async(requests: list[Request], buffer: Any) -> PendingFill:
    """fill_bitmask on the grammar thread; returns once that thread is inside xgrammar's call
    (which holds no GIL), so the caller's Python runs beside it at once."""
    global _grammar_thread
    fill = _prepare(requests, buffer)
    if _grammar_thread is None:
        with _start_lock:
            if _grammar_thread is None:
                _grammar_thread = _GrammarThread()
    _grammar_thread.jobs.put(fill)
    fill.started.acquire()   # a blocking wait drops the GIL: the grammar thread takes it now
    return fill


def accept(request: Request, token: int) -> tuple[bool, bool]:
    """Advance the request's matcher by `token`: (accepted, terminated). Terminated: the
    grammar is complete and its stop token was accepted. One call per row: xgrammar's
    batch_accept_token does the same work in C++ (accept_token itself is the cost, ~2 us) and
    reading each element of its result costs more than is_terminated (benchmarks/grammar_fill.py)."""
    matcher = _matcher(request)
    if not matcher.accept_token(token):
        return False, matcher.is_terminated()
    return True, matcher.is_terminated()
