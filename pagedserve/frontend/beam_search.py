"""Beam search, as vLLM runs it: a loop over the engine, one token a step. Each step every live
beam is a one-token request (its prompt is the beam's tokens so far, so the prefix cache holds
what beams share: only the last partial block is computed again) asking for the 2 * width
most likely next tokens; a candidate ending in an end-of-sequence token completes a beam,
the `width` best other candidates (by cumulative logprob) are the next step's beams. After
max_tokens steps (or when no beam is left) the completed and the live beams are ranked by
cumulative logprob / length ** length_penalty, the length counting the prompt and not the
final end-of-sequence token (vLLM's score), and the `width` best are the result.

`BeamSearch` is one prompt's search and touches no engine; LLM.beam_search (offline, every
prompt's beams of a step in one batch) and `run_async` (the server, through the AsyncEngine)
drive it. `from_sampling_params` is the server's mapping (vLLM's use_beam_search: n beams)
and refuses what a beam search would silently ignore."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from pagedserve.errors import RequestFailedError, ValidationError
from pagedserve.frontend.output_processor import OutputKind
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:   # the async engine imports nothing from here
    from pagedserve.frontend.async_engine import AsyncEngine


@dataclass
class BeamSearchSequence:
    """One beam: `tokens` are the prompt's and the generated ones (vLLM's layout); `logprobs`
    holds one dict per generated token (the candidates of its step)."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]   # best first


# SamplingParams fields a beam search does not apply: a request that sets one is refused
_NOT_APPLIED = (("stop", lambda p: bool(p.stop)), ("stop_token_ids", lambda p: bool(p.stop_token_ids)),
                ("min_tokens", lambda p: p.min_tokens > 0), ("logit_bias", lambda p: bool(p.logit_bias)),
                ("allowed_token_ids", lambda p: p.allowed_token_ids is not None),
                ("bad_words", lambda p: bool(p.bad_words)),   # vLLM's beam search ignores them
                ("presence_penalty", lambda p: p.presence_penalty != 0.0),
                ("frequency_penalty", lambda p: p.frequency_penalty != 0.0),
                ("repetition_penalty", lambda p: p.repetition_penalty != 1.0),
                ("prompt_logprobs", lambda p: p.prompt_logprobs is not None),
                ("best_of", lambda p: p.best_of is not None and p.best_of != p.n))


def from_sampling_params(params: SamplingParams, length_penalty: float, max_tokens: int) -> BeamSearchParams:
    """use_beam_search on the OpenAI routes: `n` beams of up to `max_tokens` tokens. What a beam
    search would not apply (stop strings, penalties, biases, structured outputs, ...) is a
    ValidationError naming the field, not ignored."""
    for name, is_set in _NOT_APPLIED:
        if is_set(params):
            raise ValidationError(f"{name} cannot be used with use_beam_search", name)
    if params.structured_outputs is not None:
        raise ValidationError("a structured-outputs constraint (response_format, structured_outputs, guided_*, "
                              "tool_choice) cannot be used with use_beam_search", "use_beam_search")
    return BeamSearchParams(params.n, max_tokens, params.ignore_eos, params.temperature, length_penalty,
                            params.include_stop_str_in_output)


class BeamSearch:
    """One prompt's beam search: `beams` are this step's (each to be run for one token), then
    `advance` with what the engine returned for each. Touches no engine."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: tuple[int, ...],
                 num_logprobs: int | None = None) -> None:
        self.params = params
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.eos = frozenset(() if params.ignore_eos else eos_token_ids)
        self.beams = [BeamSearchSequence(list(prompt_token_ids))]
        self.completed: list[BeamSearchSequence] = []
        self.steps = 0
        # each beam's request: the 2 * width best next tokens (and the caller's top logprobs)
        self.step_params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                          logprobs=max(2 * params.beam_width, num_logprobs or 0))

    @property
    def done(self) -> bool:
        return not self.beams or self.steps >= self.params.max_tokens

    def advance(self, step: list[dict[int, Logprob]]) -> None:
        """`step[i]`: the next-token logprobs the engine gave for beams[i]."""
        if len(step) != len(self.beams):
            raise ValueError(f"{len(step)} results for {len(self.beams)} beams")
        candidates: list[tuple[float, int, BeamSearchSequence, dict[int, Logprob]]] = []
        include_eos = self.params.include_stop_str_in_output
        for beam, logprobs in zip(self.beams, step):
            for token, entry in logprobs.items():
                total = beam.cum_logprob + entry.logprob
                if token in self.eos:
                    tokens = beam.tokens + [token] if include_eos else list(beam.tokens)
                    self.completed.append(BeamSearchSequence(tokens, beam.logprobs + [logprobs], total,
                                                             finish_reason="stop"))
                else:
                    candidates.append((total, token, beam, logprobs))
        candidates.sort(key=lambda c: -c[0])   # stable: ties stay in beam, then rank, order
        self.beams = [BeamSearchSequence(beam.tokens + [token], beam.logprobs + [logprobs], total)
                      for total, token, beam, logprobs in candidates[:self.params.beam_width]]
        self.steps += 1

    def score(self, beam: BeamSearchSequence) -> float:
        length = len(beam.tokens) - (1 if beam.tokens and beam.tokens[-1] in self.eos else 0)
        return beam.cum_logprob / (length ** self.params.length_penalty)

    def best(self) -> list[BeamSearchSequence]:
        """The `width` best of the completed and the live beams (live ones end by length)."""
        for beam in self.beams:
            beam.finish_reason = "length"
        ranked = sorted(self.completed + self.beams, key=self.score, reverse=True)
        return ranked[:self.params.beam_width]

    def generated(self, beam: BeamSearchSequence) -> list[int]:
        """A beam's generated token ids (with its end-of-sequence token if it was asked for)."""
        return beam.tokens[self.num_prompt_tokens:]

    def request_output(self, request_id: str, prompt: str | None, decode: Callable[[list[int]], str] | None,
                       num_logprobs: int | None = None) -> RequestOutput:
        """The result as one finished RequestOutput with one CompletionOutput per beam (best
        first): what the OpenAI routes format as `n` choices. The text leaves out a final
        end-of-sequence token; `num_logprobs`: each token's dict cut to its top ones and itself."""
        outputs = []
        for index, beam in enumerate(self.best()):
            token_ids = self.generated(beam)
            text_ids = token_ids[:-1] if token_ids and token_ids[-1] in self.eos else token_ids
            logprobs = None
            if num_logprobs is not None:
                logprobs = [_top(entry, token, num_logprobs) for entry, token in zip(beam.logprobs, token_ids)]
            outputs.append(CompletionOutput(index, decode(text_ids) if decode is not None else "", token_ids,
                                            beam.cum_logprob, logprobs, beam.finish_reason, beam.stop_reason))
        return RequestOutput(request_id, prompt, list(self.prompt_token_ids), outputs, True)


def _top(entry: dict[int, Logprob], token: int, k: int) -> dict[int, Logprob]:
    """The chosen token's and the k best of one step's candidates."""
    return {t: lp for t, lp in entry.items() if t == token or (lp.rank is not None and lp.rank <= k)}


def step_logprobs(output: RequestOutput) -> dict[int, Logprob]:
    """The candidates one beam's one-token request returned (raises for a failed request)."""
    if output.error is not None or not output.outputs or not output.outputs[0].logprobs:
        raise RequestFailedError(f"a beam search step failed: {output.error or 'no logprobs returned'}")
    return output.outputs[0].logprobs[0]


async def run_async(engine: AsyncEngine, request_id: str, prompt_token_ids: list[int], prompt: str | None,
                    params: BeamSearchParams, eos_token_ids: tuple[int, ...], num_logprobs: int | None = None,
                    cache_salt: str | None = None, priority: int = 0, lora_request: Any = None) -> RequestOutput:
    """One prompt's beam search through the async engine: each step's beams as concurrent
    one-token requests (a ValidationError of the first step is the request's). Cancelled (the
    client left), the step's requests are aborted."""
    search = BeamSearch(prompt_token_ids, params, eos_token_ids, num_logprobs)

    async def one(rid: str, tokens: list[int]) -> RequestOutput:
        final = None
        prompt_dict: dict[str, Any] = {"prompt_token_ids": tokens}
        if cache_salt is not None:
            prompt_dict["cache_salt"] = cache_salt
        async for final in engine.generate(prompt_dict, search.step_params, rid, OutputKind.FINAL_ONLY,
                                           priority=priority, lora_request=lora_request):
            pass
        return final

    while not search.done:
        outputs = await asyncio.gather(*(one(f"{request_id}-s{search.steps}-b{i}", beam.tokens)
                                         for i, beam in enumerate(search.beams)))
        search.advance([step_logprobs(output) for output in outputs])
    decode = None if engine.tokenizer is None else (
        lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True))
    return search.request_output(request_id, prompt, decode, num_logprobs)
