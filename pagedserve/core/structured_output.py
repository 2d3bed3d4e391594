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


def fill_bitmask(requests: list[Request], buffer: Any) -> Any:
    """The token bitmask of these requests' next tokens (row i: requests[i]) in the first rows
    of `buffer` (bitmask_buffer). One row at a time: on an H200 box xgrammar's
    BatchGrammarMatcher (a thread pool) made the 64-request JSON benchmark slower (11.7k vs
    19.6k tok/s)."""
    bitmask = buffer[:len(requests)]
    for row, request in enumerate(requests):
        matcher = _matcher(request)
        if matcher.is_terminated():   # a terminated row is all-allowed (it is finishing)
            bitmask[row].fill_(-1)
        else:
            matcher.fill_next_token_bitmask(bitmask, row)
    return bitmask


def accept(request: Request, token: int) -> tuple[bool, bool]:
    """Advance the request's matcher by `token`: (accepted, terminated). Terminated: the
    grammar is complete and its stop token was accepted."""
    matcher = _matcher(request)
    if not matcher.accept_token(token):
        return False, matcher.is_terminated()
    return True, matcher.is_terminated()
