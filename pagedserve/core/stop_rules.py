"""The token-level stop rules the scheduler applies to each sampled token
(Scheduler.update_from_output): a constrained request's grammar, then EOS, stop token ids,
max_tokens and max_model_len. Stop strings are the detokenizer's (frontend)."""
from __future__ import annotations

from typing import Any

from pagedserve.core.request import Request, RequestStatus


def advance_grammar(grammars: Any, request: Request, token: int) -> bool:
    """Feed a sampled token to the request's matcher; True (status set) if that ends the
    request: the grammar terminated (stop), or it refused the token (error: the request's
    own if it had nothing to sample, see refusal and banned_all; else mask_failure)."""
    accepted, terminated = grammars.accept(request, token)
    if not accepted:
        request.status = RequestStatus.FINISHED_ERROR
        if grammars.refused_by_request(request):
            request.error, request.error_param = refusal(token), REFUSED_PARAM
        elif request.sampling_params.bad_words:   # the grammar allowed tokens, the request banned them all
            request.error, request.error_param = banned_all(token), "bad_words"
        else:
            request.error = mask_failure(token)
        return True
    if terminated:
        request.status = RequestStatus.FINISHED_STOPPED
        return True
    return False


REFUSED_PARAM = "structured_outputs"   # the parameter a refused token's failure names


def refusal(token: int) -> str:
    """Why a request fails whose grammar refused its sampled token and allows no token at
    all there: a grammar with no continuation after this prefix (the regex `a[^\\s\\S]`
    after "a"). The request's own doing: the frontend raises a ValidationError naming
    REFUSED_PARAM."""
    return ("structured_outputs: no token can continue the output: the grammar admits no continuation after "
            f"the text generated so far (token {token} was sampled from an empty choice and refused)")


def admits_nothing(matcher: Any, vocab_size: int) -> bool:
    """Whether the matcher allows no next token at all. Asked only when it refused a sampled
    token: then the request had nothing to sample (its grammar's doing), unless masking
    failed (the engine's). (allowed_token_ids, a second mask, cannot come with a grammar.)"""
    import xgrammar
    if matcher is None or matcher.is_terminated():
        return False
    bits = xgrammar.allocate_token_bitmask(1, vocab_size)
    matcher.fill_next_token_bitmask(bits)
    return not bool(bits.any())


def banned_all(token: int) -> str:
    """Why a request fails whose grammar refused its sampled token although it allowed others,
    where the request has bad_words: they banned every token the grammar allowed there (the
    row had nothing left to sample). The request's own doing, named as bad_words: masking is
    exact (tested against xgrammar), so a lost mask is not the likely cause."""
    return ("bad_words: no token can continue the output: bad_words ban every token the structured-outputs "
            f"grammar allows after the text generated so far (token {token} was sampled from an empty choice and "
            "refused)")


def mask_failure(token: int) -> str:
    """Why a request fails whose grammar refused a token although it allowed others: the
    mask did not reach the sampler (the engine's fault)."""
    return f"sampled token {token} does not match the request's structured_outputs grammar"


def check_stop(request: Request, token: int, max_model_len: int) -> bool:
    """Set a finished status if `token` ends the request; True if it did."""
    params = request.sampling_params
    num_output = len(request.output_token_ids)
    if num_output >= params.min_tokens:
        if not params.ignore_eos and token in request.eos_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            return True
        if token in params.stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = token
            return True
    if num_output >= request.max_tokens or len(request.prompt_token_ids) + num_output >= max_model_len:
        request.status = RequestStatus.FINISHED_LENGTH_CAPPED
        return True
    return False
