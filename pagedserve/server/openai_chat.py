"""POST /v1/chat/completions: messages -> chat template -> one engine request with n
sequences. A stream sends, per choice, a role chunk, content deltas, then a chunk with an
empty delta and the finish_reason; an optional usage chunk; then [DONE]."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedserve.frontend.async_engine import RequestStream
from pagedserve.frontend.output_processor import OutputKind
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.server.context import ServerContext, new_request_id
from pagedserve.server.errors import error_payload
from pagedserve.server.openai_logprobs import chat_logprobs, prompt_logprobs_json
from pagedserve.server.openai_protocol import ChatCompletionRequest
from pagedserve.server.streaming import (DONE_EVENT, SSEResponse, add_prompts, close_all, final_outputs,
                                         merge_streams, sse_event, unless_disconnected)
from pagedserve.server.usage import Usage

ASSISTANT = "assistant"


async def create_chat_completion(ctx: ServerContext, request: ChatCompletionRequest,
                                 raw_request: Request) -> Response:
    ctx.check_model(request.model)
    params = request.to_sampling_params()
    prompt = ctx.engine.render_chat([m.as_template_message() for m in request.messages],
                                    request.chat_template or ctx.settings.chat_template,
                                    request.add_generation_prompt, request.continue_final_message)
    response_id, engine_id = new_request_id("chatcmpl", request.request_id)
    kind = OutputKind.DELTA if request.stream else OutputKind.FINAL_ONLY
    streams = await add_prompts(ctx.engine, engine_id, [request.engine_prompt(prompt)], params, kind,
                                request.add_special_tokens)
    builder = _ChatBuilder(ctx, request, response_id)
    if request.stream:
        return SSEResponse(builder.stream(streams))
    try:
        finals = await unless_disconnected(final_outputs(streams), raw_request)
    finally:
        close_all(streams)
    return JSONResponse(builder.response(finals[0]))


@dataclass
class _ChatBuilder:
    ctx: ServerContext
    request: ChatCompletionRequest
    response_id: str
    usage: Usage = field(default_factory=Usage)

    def response(self, output: RequestOutput) -> dict[str, Any]:
        self.usage.add_prompt(0, len(output.prompt_token_ids))
        choices = []
        for completion in output.outputs:
            self.usage.add_completion(len(completion.token_ids))
            choices.append({"index": completion.index,
                            "message": {"role": ASSISTANT, "content": completion.text},
                            "logprobs": self._logprobs(completion),
                            "finish_reason": completion.finish_reason,
                            "stop_reason": completion.stop_reason})
        body = {"id": self.response_id, "object": "chat.completion", "created": self.ctx.created,
                "model": self.ctx.model_name, "choices": choices, "usage": self.usage.as_dict()}
        if self.request.prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs_json(output.prompt_logprobs)
        return body

    async def stream(self, streams: list[RequestStream]) -> AsyncIterator[str]:
        options = self.request.stream_options
        continuous = options is not None and bool(options.include_usage and options.continuous_usage_stats)
        try:
            for index in range(self.request.n or 1):
                yield sse_event(self._chunk(index, {"role": ASSISTANT, "content": ""}))
            async for _, output in merge_streams(streams):
                self.usage.add_prompt(0, len(output.prompt_token_ids))
                for completion in output.outputs:
                    for chunk in self._deltas(completion):
                        if continuous:
                            chunk["usage"] = self.usage.as_dict()
                        yield sse_event(chunk)
            if options is not None and options.include_usage:
                yield sse_event({**self._envelope([]), "usage": self.usage.as_dict()})
        except Exception as exc:
            yield sse_event(error_payload(exc))
        finally:
            close_all(streams)
        yield DONE_EVENT

    def _deltas(self, completion: CompletionOutput) -> list[dict[str, Any]]:
        self.usage.add_completion(len(completion.token_ids))
        chunks = []
        logprobs = self._logprobs(completion)
        if completion.text or (logprobs and logprobs["content"]):
            chunks.append(self._chunk(completion.index, {"content": completion.text}, logprobs))
        if completion.finish_reason is not None:
            chunks.append(self._chunk(completion.index, {}, None, completion.finish_reason, completion.stop_reason))
        return chunks

    def _chunk(self, index: int, delta: dict[str, Any], logprobs: dict | None = None,
               finish_reason: str | None = None, stop_reason: int | str | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return self._envelope([choice])

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.response_id, "object": "chat.completion.chunk", "created": self.ctx.created,
                "model": self.ctx.model_name, "choices": choices}

    def _logprobs(self, completion: CompletionOutput) -> dict[str, Any] | None:
        if not self.request.logprobs or completion.logprobs is None:
            return None
        return chat_logprobs(self.ctx, completion.token_ids, completion.logprobs, self.request.top_logprobs or 0,
                             bool(self.request.return_tokens_as_token_ids))
