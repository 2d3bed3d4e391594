"""Structured outputs, the core half: one xgrammar GrammarMatcher per constrained sequence
(parallel samples each have their own) and the step's token bitmask.

The scheduler calls `fill_bitmask` with the constrained requests that sample in the step it
is building: one int32 CPU tensor [rows, ceil(vocab / 32)] (row i for requests[i]) goes to
the worker on the SchedulerOutput, which applies it to those rows' logits. With async
scheduling the step is scheduled while the previous one runs on the device, so the mask is
filled on the host meanwhile. `accept` advances a matcher by a sampled token, once per token:
tokens recomputed after preemption are never accepted again (the matcher keeps its state).
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


def fill_bitmask(requests: list[Request]) -> Any:
    """The token bitmask of these requests' next tokens (row i: requests[i]); a CPU tensor.
    One row at a time: on an H200 box xgrammar's BatchGrammarMatcher (a thread pool) made the
    64-request JSON benchmark slower (11.7k vs 19.6k tok/s)."""
    import xgrammar
    bitmask = xgrammar.allocate_token_bitmask(len(requests), requests[0].grammar.tokenizer_info.vocab_size)
    for row, request in enumerate(requests):
        matcher = _matcher(request)
        if not matcher.is_terminated():   # a terminated row stays all-allowed (it is finishing)
            matcher.fill_next_token_bitmask(bitmask, row)
    return bitmask


def accept(request: Request, token: int) -> tuple[bool, bool]:
    """Advance the request's matcher by `token`: (accepted, terminated). Terminated: the
    grammar is complete and its stop token was accepted."""
    matcher = _matcher(request)
    if not matcher.accept_token(token):
        return False, matcher.is_terminated()
    return True, matcher.is_terminated()
