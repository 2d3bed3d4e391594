"""vLLM's `use_beam_search` on /v1/completions and /v1/chat/completions: `n` beams per prompt
(frontend/beam_search.py), `length_penalty`, `max_tokens`, `ignore_eos`,
`include_stop_str_in_output`, `logprobs`; what a beam search would not apply is a 400 naming
the field. The result is one finished output per prompt with the `n` best beams as its
choices (best first), formatted by the route's usual builder; a stream gets them in one piece,
then [DONE], as vLLM's does."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Sequence

from fastapi import Request

from pagedserve.frontend.beam_search import from_sampling_params, run_async
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.server.context import ServerContext, off_loop
from pagedserve.server.openai_protocol import ChatCompletionRequest, CompletionRequest
from pagedserve.server.streaming import unless_disconnected


class FinishedStream:
    """A request stream whose one output is already known (a beam search's result)."""

    def __init__(self, output: RequestOutput) -> None:
        self.output = output

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        yield self.output

    def close(self) -> None:
        pass


async def beam_search_outputs(ctx: ServerContext, request: CompletionRequest | ChatCompletionRequest,
                              params: SamplingParams, prompts: Sequence[str | list[int]], engine_id: str,
                              add_special_tokens: bool, raw_request: Request, lora_request: Any = None
                              ) -> list[RequestOutput]:
    """Each prompt's beam search, concurrently; every limit is checked before any runs."""
    processor = ctx.engine.engine.input_processor
    processor.check_priority(request.priority)
    num_logprobs = processor.vocab_size if params.logprobs == -1 else params.logprobs
    searches = []
    for prompt in prompts:
        if isinstance(prompt, str):   # one that surely cannot fit is refused before it is tokenized whole
            await off_loop(processor.check_text_length, prompt)
        ids = list(prompt) if isinstance(prompt, list) else await ctx.engine.tokenize_prompt(prompt, add_special_tokens)
        max_tokens = params.max_tokens if params.max_tokens is not None else ctx.engine.max_model_len - len(ids)
        beam = from_sampling_params(params, request.length_penalty, max(max_tokens, 1))
        processor.check_beam_search(len(ids), beam.beam_width, beam.max_tokens, "n")
        searches.append((ids, prompt if isinstance(prompt, str) else None, beam))
    eos = ctx.engine.engine.eos_token_ids
    work = asyncio.gather(*(run_async(ctx.engine, f"{engine_id}-{i}", ids, text, beam, eos, num_logprobs,
                                      request.cache_salt, request.priority, lora_request)
                            for i, (ids, text, beam) in enumerate(searches)))
    return await unless_disconnected(work, raw_request)
