"""Structured outputs, the core half: one xgrammar GrammarMatcher per constrained sequence
(parallel samples each have their own) and the step's token bitmask.

The scheduler fills the token bitmask of the constrained requests that sample in a step:
one int32 CPU tensor [rows, ceil(vocab / 32)] (row i for requests[i], the first rows of a
buffer the scheduler reuses) goes to the worker on the SchedulerOutput, which applies it to
those rows' logits. With async scheduling the mask is filled after the previous step's
tokens are applied, while the device runs this step's forward pass (scheduler.py).
`accept` advances a matcher by a sampled token, once per token: tokens recomputed after
preemption are never accepted again (the matcher keeps its state).

Each xgrammar call goes through tvm_ffi, which drops and retakes the GIL: the fill is one
batch call for all the rows. Filling on a second thread beside the engine thread hid 78% of
the fill behind Python work in isolation but gained nothing end to end on an H200 host
(benchmarks/RESULTS.md, issue 20, fourth pass), so the fill stays on the engine thread.
"""
from __future__ import annotations

from typing import Any

from pagedserve.core.request import Request


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


def bitmask_buffer(requests: list[Request], buffer: Any = None) -> Any:
    """`buffer` if it has the rows and width for these requests' bitmask, else a new one. A
    fresh tensor per step cost more than filling 64 rows (page faults)."""
    import xgrammar
    vocab_size = requests[0].grammar.tokenizer_info.vocab_size
    width = xgrammar.get_bitmask_shape(1, vocab_size)[1]
    if buffer is None or buffer.shape[0] < len(requests) or buffer.shape[1] != width:
        buffer = xgrammar.allocate_token_bitmask(max(len(requests), 64), vocab_size)
    return buffer


def fill_bitmask(requests: list[Request], buffer: Any) -> Any:
    """The token bitmask of these requests' next tokens (row i: requests[i]) in the first rows
    of `buffer` (bitmask_buffer), in one xgrammar call. A finished request's row (a deferred
    fill's request that ended meanwhile: its token is dropped, and its matcher may have
    terminated, which xgrammar refuses to fill) is all-allowed."""
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
