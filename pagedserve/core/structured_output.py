"""Structured outputs, the core half: one xgrammar GrammarMatcher per constrained sequence
(parallel samples each have their own) and the step's token bitmask.

The scheduler fills the token bitmask of the constrained requests that sample in a step:
one int32 CPU tensor [rows, ceil(vocab / 32)] (row i for requests[i], the first rows of a
buffer the scheduler reuses) goes to the worker on the SchedulerOutput, which applies it to
those rows' logits. With async scheduling the mask is filled after the previous step's
tokens are applied, while the device runs this step's forward pass (scheduler.py).
`accept` advances a matcher by a sampled token, once per token: tokens recomputed after
preemption are never accepted again (the matcher keeps its state).
"""
from __future__ import annotations

import functools
import os
from typing import Any

from pagedserve.core.request import Request


def _matcher(request: Request) -> Any:
    matcher = request.grammar_matcher
    if matcher is None:
        import xgrammar
        matcher = request.grammar_matcher = xgrammar.GrammarMatcher(request.grammar)
    return matcher


def bitmask_buffer(requests: list[Request], buffer: Any = None) -> Any:
    """`buffer` if it has the rows and width for these requests' bitmask, else a new one. A
    fresh tensor per step cost more than filling 64 rows (page faults)."""
    import xgrammar
    vocab_size = requests[0].grammar.tokenizer_info.vocab_size
    width = xgrammar.get_bitmask_shape(1, vocab_size)[1]
    if buffer is None or buffer.shape[0] < len(requests) or buffer.shape[1] != width:
        buffer = xgrammar.allocate_token_bitmask(max(len(requests), 64), vocab_size)
    return buffer


def fill_threads() -> int:
    """Threads of xgrammar's batch matcher for the fill (PAGEDSERVE_GRAMMAR_THREADS); 0: one
    Python call per row on this thread."""
    return int(os.environ.get("PAGEDSERVE_GRAMMAR_THREADS", "0"))


@functools.lru_cache(maxsize=None)
def _batch_matcher(threads: int) -> Any:
    import xgrammar
    return xgrammar.BatchGrammarMatcher(max_threads=threads)


def fill_bitmask(requests: list[Request], buffer: Any, threads: int | None = None) -> Any:
    """The token bitmask of these requests' next tokens (row i: requests[i]) in the first rows
    of `buffer` (bitmask_buffer). threads > 0: one call into xgrammar's batch matcher, which
    drops the GIL and fills the rows on its C++ thread pool; 0: row by row."""
    threads = fill_threads() if threads is None else threads
    bitmask = buffer[:len(requests)]
    matchers = [_matcher(request) for request in requests]
    live = []
    for row, matcher in enumerate(matchers):
        if matcher.is_terminated():   # a terminated row is all-allowed (it is finishing)
            bitmask[row].fill_(-1)
        elif threads <= 0:
            matcher.fill_next_token_bitmask(bitmask, row)
        else:
            live.append(row)
    if live:
        _batch_matcher(threads).batch_fill_next_token_bitmask(
            [matchers[row] for row in live], bitmask, None if len(live) == len(matchers) else live)
    return bitmask


def accept(request: Request, token: int) -> tuple[bool, bool]:
    """Advance the request's matcher by `token`: (accepted, terminated). Terminated: the
    grammar is complete and its stop token was accepted."""
    matcher = _matcher(request)
    if not matcher.accept_token(token):
        return False, matcher.is_terminated()
    return True, matcher.is_terminated()
