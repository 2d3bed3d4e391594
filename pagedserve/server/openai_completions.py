"""POST /v1/completions: one engine request per prompt (or, with use_beam_search, one beam
search: server/beam.py); choice index = prompt index * n + sequence index (as vLLM numbers them). A stream reports each choice's finish_reason once;
every non-streamed choice carries `prompt_logprobs` (null unless asked for), as vLLM's.

`echo` with max_tokens 0 (vLLM's echo_without_generation, OpenAI's legacy API): each choice is the
prompt, with `logprobs` the prompt's token logprobs, finish_reason "length". The engine runs one
token (its prompt logprobs need a forward pass) taken whole (FINAL_ONLY, one chunk a choice when
streamed); the text and logprobs leave that token out, and, as vLLM's, usage.completion_tokens and
return_token_ids' `token_ids` count it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedserve.frontend.async_engine import RequestStream
from pagedserve.frontend.output_processor import OutputKind
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.server import structured
from pagedserve.server.beam import FinishedStream, beam_search_outputs
from pagedserve.server.context import ServerContext, new_request_id
from pagedserve.server.errors import error_payload
from pagedserve.server.openai_common import params_observer, truncate_prompts, usage_options, warn_ignored_fields
from pagedserve.server.openai_logprobs import CompletionLogprobs, prompt_logprobs_json
from pagedserve.server.openai_protocol import CompletionRequest
from pagedserve.server.streaming import (DONE_EVENT, SSEResponse, add_prompts, close_all, final_outputs,
                                         merge_streams, sse_event, unless_disconnected)
from pagedserve.server.usage import Usage


async def create_completion(ctx: ServerContext, request: CompletionRequest, raw_request: Request) -> Response:
    lora = ctx.check_model(request.model)
    warn_ignored_fields(request, "/v1/completions")
    params = request.to_sampling_params()
    prompts = await truncate_prompts(ctx, request.prompts(), request.truncate_prompt_tokens,
                                     request.add_special_tokens)
    response_id, engine_id = new_request_id("cmpl", request.request_id)
    if request.use_beam_search:
        finals = await beam_search_outputs(ctx, request, params, prompts, engine_id, request.add_special_tokens,
                                           raw_request, lora)
        builder = _CompletionBuilder(ctx, request, response_id, params_observer(
            raw_request, params.n, params.max_tokens, ctx.engine.max_model_len))
        if request.stream:
            return SSEResponse(builder.stream([FinishedStream(final) for final in finals]))
        return JSONResponse(builder.response(finals))
    prompts = [request.engine_prompt(prompt) for prompt in prompts]
    # echo without generation: the prompt logprobs whole, in the one output there is
    kind = OutputKind.DELTA if request.stream and not request.echo_without_generation else OutputKind.FINAL_ONLY
    constraint = request.structured_constraint()
    with structured.naming(constraint):   # compile errors name the request's field
        streams = await add_prompts(ctx.engine, engine_id, prompts, params, kind, request.add_special_tokens,
                                    request.priority, lora)
    streams = structured.named_streams(streams, constraint)   # and a grammar's dead end found later
    observe = params_observer(raw_request, params.n, params.max_tokens, ctx.engine.max_model_len)
    builder = _CompletionBuilder(ctx, request, response_id, observe)
    if request.stream:
        return SSEResponse(builder.stream(streams))
    try:
        finals = await unless_disconnected(final_outputs(streams), raw_request)
    finally:
        close_all(streams)
    return JSONResponse(builder.response(finals))


@dataclass
class _ChoiceState:
    logprobs: CompletionLogprobs
    echo_pending: bool
    num_tokens: int = 0
    first: bool = True        # its first chunk not sent yet (prompt_token_ids go there)
    finished: bool = False    # its finish_reason sent


@dataclass
class _CompletionBuilder:
    ctx: ServerContext
    request: CompletionRequest
    response_id: str
    observe_params: Callable[[int], None]
    choices: dict[int, _ChoiceState] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    created: int = field(default_factory=lambda: int(time.time()))   # this response's time
    observed: set[int] = field(default_factory=set)
    # the response's `model`, fixed when the request starts (an adapter unloaded meanwhile keeps its name)
    model: str = field(init=False)

    def __post_init__(self) -> None:
        self.model = self.ctx.response_model(self.request.model)

    @property
    def as_token_ids(self) -> bool:
        value = self.request.return_tokens_as_token_ids
        return self.ctx.settings.return_tokens_as_token_ids if value is None else value

    def _add_prompt(self, prompt_index: int, output: RequestOutput) -> None:
        self.usage.add_prompt(prompt_index, len(output.prompt_token_ids))
        if prompt_index not in self.observed:
            self.observed.add(prompt_index)
            self.observe_params(len(output.prompt_token_ids))

    @property
    def n(self) -> int:
        return self.request.n or 1

    def response(self, finals: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for prompt_index, output in enumerate(finals):
            self._add_prompt(prompt_index, output)
            for completion in output.outputs:
                choice = self._choice(prompt_index, output, completion)
                choice["prompt_logprobs"] = (prompt_logprobs_json(output.prompt_logprobs)
                                             if self.request.prompt_logprobs is not None else None)
                choices.append(choice)
        choices.sort(key=lambda c: c["index"])
        return {"id": self.response_id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage.as_dict()}

    async def stream(self, streams: list[RequestStream]) -> AsyncIterator[str]:
        include_usage, continuous = usage_options(self.request.stream_options,
                                                  self.ctx.settings.enable_force_include_usage)
        try:
            async for prompt_index, output in merge_streams(streams):
                self._add_prompt(prompt_index, output)
                for completion in output.outputs:
                    state = self.choices.get(prompt_index * self.n + completion.index)
                    if state is not None and state.finished:
                        continue   # a finished choice is reported once
                    chunk = self._chunk([self._choice(prompt_index, output, completion)])
                    if continuous:
                        chunk["usage"] = self.usage.as_dict()
                    yield sse_event(chunk)
            if include_usage:
                yield sse_event({**self._chunk([]), "usage": self.usage.as_dict()})
        except Exception as exc:
            yield sse_event(error_payload(exc))
        finally:
            close_all(streams)
        yield DONE_EVENT

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.response_id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices}

    def _choice(self, prompt_index: int, output: RequestOutput, completion: CompletionOutput) -> dict[str, Any]:
        index = prompt_index * self.n + completion.index
        state = self.choices.get(index)
        if state is None:
            state = _ChoiceState(CompletionLogprobs(self.ctx, self.as_token_ids), echo_pending=bool(self.request.echo))
            self.choices[index] = state
        text, token_ids, logprobs = completion.text, completion.token_ids, completion.logprobs
        finish_reason, stop_reason = completion.finish_reason, completion.stop_reason
        output_token_ids = list(token_ids)
        self.usage.add_completion(len(token_ids))
        if self.request.echo_without_generation:   # the one token the engine ran is not shown
            text, token_ids, logprobs = "", [], []
            finish_reason, stop_reason = "length", None
        if state.echo_pending:
            state.echo_pending = False
            text = self._prompt_text(output) + text
            if self.request.logprobs is not None:
                token_ids = output.prompt_token_ids + token_ids
                logprobs = _prompt_logprobs(output) + list(logprobs or [])
        logprobs_json = None
        if self.request.logprobs is not None and logprobs is not None:
            logprobs_json = state.logprobs.build(token_ids, logprobs)
        choice = {"index": index, "text": text, "logprobs": logprobs_json,
                  "finish_reason": finish_reason, "stop_reason": stop_reason}
        if self.request.return_token_ids:
            if state.first:
                choice["prompt_token_ids"] = list(output.prompt_token_ids)
            choice["token_ids"] = output_token_ids
        state.first = False
        state.finished = finish_reason is not None
        return choice

    def _prompt_text(self, output: RequestOutput) -> str:
        return output.prompt if output.prompt is not None else self.ctx.decode(output.prompt_token_ids)


def _prompt_logprobs(output: RequestOutput) -> list:
    """One entry per prompt token (None where the engine gave none)."""
    entries = list(output.prompt_logprobs or [])
    count = len(output.prompt_token_ids)
    return (entries + [None] * count)[:count]
