"""POST /v1/chat/completions: messages -> chat template -> one engine request with n
sequences. A stream sends, with the first output (as vLLM does), per choice a role chunk (then the echoed last message with
`echo`), content deltas, then one chunk with an empty delta and the finish_reason (exactly
once per choice); a usage chunk when include_usage (or --enable-force-include-usage); then
[DONE]. With continuous_usage_stats every chunk, the role chunks included, carries usage.
With tools (tool_calls.py), calls come back as message.tool_calls / tool_calls deltas and
finish_reason "tool_calls"."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedserve.frontend.async_engine import RequestStream
from pagedserve.frontend.output_processor import OutputKind
from pagedserve.errors import ValidationError
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams
from pagedserve.server.beam import FinishedStream, beam_search_outputs
from pagedserve.server.context import ServerContext, new_request_id
from pagedserve.server.errors import error_payload
from pagedserve.server.openai_common import params_observer, truncate_prompts, usage_options, warn_ignored_fields
from pagedserve.server.openai_logprobs import chat_logprobs, prompt_logprobs_json
from pagedserve.server.openai_protocol import ChatCompletionRequest, effort_template_kwargs
from pagedserve.server import structured
from pagedserve.server.reasoning import ReasoningStream, message_fields, split
from pagedserve.server.streaming import (DONE_EVENT, SSEResponse, add_prompts, close_all, final_outputs,
                                         merge_streams, sse_event, unless_disconnected)
from pagedserve.server.tool_calls import ToolCallStream, ToolPlan, template_tools
from pagedserve.server.usage import Usage

ASSISTANT = "assistant"


async def create_chat_completion(ctx: ServerContext, request: ChatCompletionRequest,
                                 raw_request: Request) -> Response:
    lora = ctx.check_model(request.model)
    warn_ignored_fields(request, "/v1/chat/completions")
    params = request.to_sampling_params()
    plan = request.tool_plan(ctx.settings.enable_auto_tool_choice, ctx.settings.tool_call_parser)
    constraint = tool_constraint(plan, params) or request.structured_constraint()
    messages = [m.as_template_message(position) for position, m in enumerate(request.messages)]
    prompt = await ctx.engine.render_chat_async(messages, request.chat_template or ctx.settings.chat_template,
                                                request.add_generation_prompt, request.continue_final_message,
                                                template_tools(request.tools), request.documents,
                                                {**effort_template_kwargs(request.reasoning_effort),
                                                 **(request.chat_template_kwargs or {})} or None)
    [prompt] = await truncate_prompts(ctx, [prompt], request.truncate_prompt_tokens, request.add_special_tokens)
    response_id, engine_id = new_request_id("chatcmpl", request.request_id)
    if request.use_beam_search:
        [final] = await beam_search_outputs(ctx, request, params, [prompt], engine_id, request.add_special_tokens,
                                            raw_request, lora)
        builder = _ChatBuilder(ctx, request, response_id, params_observer(
            raw_request, params.n, params.max_tokens, ctx.engine.max_model_len), plan)
        if request.stream:
            return SSEResponse(builder.stream([FinishedStream(final)]))
        return JSONResponse(builder.response(final))
    kind = OutputKind.DELTA if request.stream else OutputKind.FINAL_ONLY
    with structured.naming(constraint):   # compile errors name the request's field
        streams = await add_prompts(ctx.engine, engine_id, [request.engine_prompt(prompt)], params, kind,
                                    request.add_special_tokens, request.priority, lora)
    streams = structured.named_streams(streams, constraint)   # and a grammar's dead end found later
    observe = params_observer(raw_request, params.n, params.max_tokens, ctx.engine.max_model_len)
    builder = _ChatBuilder(ctx, request, response_id, observe, plan)
    if request.stream:
        return SSEResponse(builder.stream(streams))
    try:
        finals = await unless_disconnected(final_outputs(streams), raw_request)
    finally:
        close_all(streams)
    return JSONResponse(builder.response(finals[0]))


def tool_constraint(plan: ToolPlan, params: SamplingParams) -> structured.Constraint | None:
    """tool_choice "required" or a named function: the output follows the tools' schema
    (set on params); None for "none" / "auto"."""
    schema = plan.schema()
    if schema is None:
        return None
    if params.structured_outputs is not None:
        raise ValidationError('tool_choice "required" or a named function cannot be combined with another '
                              'structured-output constraint (response_format, structured_outputs, guided_*)',
                              "tool_choice")
    try:
        params.structured_outputs = StructuredOutputsParams(json=schema)
    except ValidationError as exc:
        raise ValidationError(f"tools: {exc.message}", "tools") from None
    return structured.Constraint(params.structured_outputs, "tools")


@dataclass
class _ChatBuilder:
    ctx: ServerContext
    request: ChatCompletionRequest
    response_id: str
    observe_params: Callable[[int], None]
    tool_plan: ToolPlan = field(default_factory=lambda: ToolPlan("none"))
    usage: Usage = field(default_factory=Usage)
    created: int = field(default_factory=lambda: int(time.time()))   # this response's time
    finished: set[int] = field(default_factory=set)
    observed: bool = False
    tool_streams: dict[int, ToolCallStream] = field(default_factory=dict)   # per choice, when tools are active
    held_logprobs: dict[int, list] = field(default_factory=dict)   # per choice: of text not sent yet
    reasoning_streams: dict[int, ReasoningStream] = field(default_factory=dict)   # per choice, with a parser
    # the response's `model`, fixed when the request starts (an adapter unloaded meanwhile keeps its name)
    model: str = field(init=False)

    def __post_init__(self) -> None:
        self.model = self.ctx.response_model(self.request.model)

    @property
    def role(self) -> str:
        """vLLM's: the assistant's, or the last message's when continuing it."""
        return ASSISTANT if self.request.add_generation_prompt else self.request.messages[-1].role

    @property
    def echo_text(self) -> str:
        """With `echo`, the last message's content when it has the response's role (vLLM)."""
        last = self.request.messages[-1]
        return last.text() if self.request.echo and last.role == self.role else ""

    @property
    def as_token_ids(self) -> bool:
        value = self.request.return_tokens_as_token_ids
        return self.ctx.settings.return_tokens_as_token_ids if value is None else value

    def _first_output(self, output: RequestOutput) -> None:
        self.usage.add_prompt(0, len(output.prompt_token_ids))
        if not self.observed:
            self.observed = True
            self.observe_params(len(output.prompt_token_ids))

    def response(self, output: RequestOutput) -> dict[str, Any]:
        self._first_output(output)
        choices = []
        for completion in output.outputs:
            self.usage.add_completion(len(completion.token_ids))
            message, finish_reason = self._message(completion)
            choice = {"index": completion.index, "message": message,
                      "logprobs": self._logprobs(completion),
                      "finish_reason": finish_reason,
                      "stop_reason": completion.stop_reason}
            if self.request.return_token_ids:
                choice["token_ids"] = list(completion.token_ids)
            choices.append(choice)
        body = {"id": self.response_id, "object": "chat.completion", "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage.as_dict(),
                "prompt_logprobs": None}
        if self.request.prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs_json(output.prompt_logprobs)
        if self.request.return_token_ids:
            body["prompt_token_ids"] = list(output.prompt_token_ids)
        return body

    def _message(self, completion: CompletionOutput) -> tuple[dict[str, Any], str | None]:
        """The choice's message and finish_reason: with tools, calls found in (or forced on)
        the output become tool_calls (content null when nothing else was said) and a
        finished call's finish_reason is "tool_calls"."""
        text, extra = completion.text, {}
        parser = self.ctx.settings.reasoning_parser
        if parser is not None:   # the chain of thought apart (server/reasoning.py); the answer is the rest
            reasoning, answer = split(text, parser)
            text, extra = answer or "", message_fields(reasoning)
        if self.request.tools is None:
            content = self.echo_text + text
            return {"role": self.role, "content": content if content or parser is None else None, **extra}, \
                completion.finish_reason
        parsed = self.tool_plan.parse(text)
        content = self.echo_text + (parsed.content or "")
        finish_reason = completion.finish_reason
        if parsed.tool_calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return ({"role": self.role, "content": content or None,
                 "tool_calls": [call.as_dict() for call in parsed.tool_calls], **extra}, finish_reason)

    async def stream(self, streams: list[RequestStream]) -> AsyncIterator[str]:
        include_usage, continuous = usage_options(self.request.stream_options,
                                                  self.ctx.settings.enable_force_include_usage)
        opened = False
        try:
            # vLLM's order: the role chunks go out with the first output (the first token),
            # not before the prefill, so a client's time to first chunk is its TTFT
            async for _, output in merge_streams(streams):
                self._first_output(output)
                if not opened:
                    opened = True
                    for chunk in self._opening(output, continuous):
                        yield sse_event(chunk)
                for completion in output.outputs:
                    if completion.index in self.finished:
                        continue   # a finished choice is reported once
                    for chunk in self._deltas(completion):
                        if continuous:
                            chunk["usage"] = self.usage.as_dict()
                        yield sse_event(chunk)
            if not opened:
                for chunk in self._opening(None, continuous):
                    yield sse_event(chunk)
            if include_usage:
                yield sse_event({**self._envelope([]), "usage": self.usage.as_dict()})
        except Exception as exc:
            yield sse_event(error_payload(exc))
        finally:
            close_all(streams)
        yield DONE_EVENT

    def _opening(self, output: RequestOutput | None, continuous: bool) -> list[dict[str, Any]]:
        """The role chunk of every choice, then the echoed text (vLLM's order); with
        continuous usage they carry the usage so far (the prompt's)."""
        chunks = [self._chunk(index, {"role": self.role, "content": ""}) for index in range(self.request.n or 1)]
        if self.echo_text:
            chunks += [self._chunk(index, {"content": self.echo_text}) for index in range(self.request.n or 1)]
        if output is not None and continuous:
            for chunk in chunks:
                chunk["usage"] = self.usage.as_dict()
        if self.request.return_token_ids and output is not None:
            chunks[0]["prompt_token_ids"] = list(output.prompt_token_ids)
        return chunks

    def _deltas(self, completion: CompletionOutput) -> list[dict[str, Any]]:
        self.usage.add_completion(len(completion.token_ids))
        if self.ctx.settings.reasoning_parser is not None:
            return self._reasoning_deltas(completion)
        if self.tool_plan.active:
            return self._tool_deltas(completion)
        chunks = []
        logprobs = self._logprobs(completion)
        if completion.text or (logprobs and logprobs["content"]) or (self.request.return_token_ids
                                                                       and completion.token_ids):
            chunk = self._chunk(completion.index, {"content": completion.text}, logprobs)
            if self.request.return_token_ids:
                chunk["choices"][0]["token_ids"] = list(completion.token_ids)
            chunks.append(chunk)
        if completion.finish_reason is not None:
            self.finished.add(completion.index)
            chunks.append(self._chunk(completion.index, {}, None, completion.finish_reason, completion.stop_reason))
        return chunks

    def _reasoning_deltas(self, completion: CompletionOutput) -> list[dict[str, Any]]:
        """With a reasoning parser: the chain of thought as `reasoning` deltas, the answer as
        `content` deltas (or into the tool-call stream); held logprobs as in _tool_deltas."""
        index = completion.index
        stream = self.reasoning_streams.setdefault(index, ReasoningStream(self.ctx.settings.reasoning_parser))
        finished = completion.finish_reason is not None
        parts = stream.feed(completion.text, finished)
        if self.tool_plan.active:
            reasoning = [self._chunk(index, message_fields(part)) for kind, part in parts if kind == "reasoning"]
            answer = "".join(part for kind, part in parts if kind == "content")
            return reasoning + self._tool_deltas(completion, answer, with_logprobs=not reasoning)
        chunks = [self._chunk(index, message_fields(part) if kind == "reasoning" else {"content": part})
                  for kind, part in parts]
        if finished:
            self.finished.add(index)
            chunks.append(self._chunk(index, {}, None, completion.finish_reason, completion.stop_reason))
        self._attach_logprobs(completion, chunks)
        return chunks

    def _attach_logprobs(self, completion: CompletionOutput, chunks: list[dict[str, Any]]) -> None:
        """This output's logprobs, and any held, on the first chunk sent; held if none is."""
        logprobs = self._logprobs(completion)
        if logprobs is not None:
            held = self.held_logprobs.setdefault(completion.index, [])
            held += logprobs["content"]
            if chunks and held:
                chunks[0]["choices"][0]["logprobs"] = {"content": held}
                self.held_logprobs[completion.index] = []

    def _tool_deltas(self, completion: CompletionOutput, text: str | None = None,
                     with_logprobs: bool = True) -> list[dict[str, Any]]:
        """Tool calls streamed as OpenAI does (tool_calls.ToolCallStream), from `text` (default:
        the output's new text). Logprobs of tokens whose text is held back ride on the next
        chunk sent (at the latest the finish chunk)."""
        index = completion.index
        tool_stream = self.tool_streams.setdefault(index, ToolCallStream(self.tool_plan))
        finished = completion.finish_reason is not None
        text = completion.text if text is None else text
        chunks = [self._chunk(index, delta) for delta in tool_stream.feed(text, finished)]
        if finished:
            self.finished.add(index)
            chunks.append(self._chunk(index, {}, None, tool_stream.finish_reason(completion.finish_reason),
                                      completion.stop_reason))
        if with_logprobs:
            self._attach_logprobs(completion, chunks)
        return chunks

    def _chunk(self, index: int, delta: dict[str, Any], logprobs: dict | None = None,
               finish_reason: str | None = None, stop_reason: int | str | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return self._envelope([choice])

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.response_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": choices}

    def _logprobs(self, completion: CompletionOutput) -> dict[str, Any] | None:
        if not self.request.logprobs or completion.logprobs is None:
            return None
        top = self.request.top_logprobs or 0
        return chat_logprobs(self.ctx, completion.token_ids, completion.logprobs, top, self.as_token_ids)
