"""POST /tokenize in both shapes and POST /detokenize (vLLM's).

    vLLM's: {"prompt": str} or {"messages": [...]} -> {"count", "max_model_len", "tokens", "token_strs"}
    TGI's:  {"inputs": str} -> [{"id", "text", "start", "stop"}] (character offsets into inputs)

A body with `inputs` is TGI's, and its errors are answered in TGI's shape. Rendering and
tokenizing run in a worker thread (context.off_loop), never on the event loop."""
from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from pagedserve.errors import ValidationError
from pagedserve.server.context import ServerContext, off_loop
from pagedserve.server.errors import API, error_response
from pagedserve.server.openai_protocol import ChatMessage
from pagedserve.server.request_body import check_json_value, parse_body, read_json
from pagedserve.server.tgi_protocol import GenerateParameters
from pagedserve.server.tool_calls import check_tools, template_tools

_TGI_FIELDS = frozenset({"inputs", "parameters", "add_special_tokens"})


_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)   # a bool is not a token id


class TokenizeRequest(BaseModel):
    model_config = _STRICT

    # vLLM's
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None   # None: true for a prompt, false for messages (TGI: true)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[Any] | None = None
    tools: list[Any] | None = None   # rendered by the chat template, as on /v1/chat/completions
    return_token_strs: bool = False
    # TGI's
    inputs: str | None = None
    parameters: GenerateParameters | None = None   # accepted and ignored, as TGI does

    def check_supported(self) -> None:
        own = _TGI_FIELDS if self.inputs is not None else set(type(self).model_fields) - {"inputs", "parameters"}
        extra = sorted(self.model_fields_set - own)
        if extra:
            raise ValidationError(f"unknown or unsupported field {extra[0]!r}", extra[0])


class DetokenizeRequest(BaseModel):
    model_config = _STRICT

    model: str | None = None
    tokens: list[int]


async def tokenize(ctx: ServerContext, request: Request) -> Response:
    api = API.OPENAI
    try:
        raw = await read_json(request, check=False)
        if isinstance(raw, dict) and "inputs" in raw:
            api = API.TGI
        await off_loop(check_json_value, raw)
        body = parse_body(TokenizeRequest, raw)
        return JSONResponse(await off_loop(_tgi_tokens, ctx, body) if api is API.TGI
                            else await _vllm_tokens(ctx, body))
    except Exception as exc:
        return error_response(exc, api)


async def detokenize(ctx: ServerContext, request: Request) -> Response:
    try:
        body = parse_body(DetokenizeRequest, await read_json(request))
        ctx.check_model(body.model)
        return JSONResponse({"prompt": await off_loop(_decode, ctx, body.tokens)})
    except Exception as exc:
        return error_response(exc)


def _decode(ctx: ServerContext, tokens: list[int]) -> str:
    vocab = len(ctx.engine.tokenizer)
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValidationError(f"token id {bad} is out of vocabulary (size {vocab})", "tokens")
    return ctx.decode(tokens)


async def _vllm_tokens(ctx: ServerContext, body: TokenizeRequest) -> dict[str, Any]:
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise ValidationError("give exactly one of prompt and messages", "prompt")
    if body.messages is not None:
        text = await ctx.engine.render_chat_async([m.as_template_message() for m in body.messages],
                                                  body.chat_template or ctx.settings.chat_template,
                                                  body.add_generation_prompt, body.continue_final_message,
                                                  _template_tools(body.tools), body.documents,
                                                  body.chat_template_kwargs)
        add_special = bool(body.add_special_tokens)   # the template already has them
    else:
        text = body.prompt or ""
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
    return await off_loop(_encode, ctx, text, add_special, body.return_token_strs)


def _template_tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    check_tools(tools)   # a 400 naming `tools` on a bad shape, as on /v1/chat/completions
    return template_tools(tools)


def _encode(ctx: ServerContext, text: str, add_special: bool, return_token_strs: bool) -> dict[str, Any]:
    tokenizer = ctx.engine.tokenizer
    tokens = tokenizer.encode(text, add_special_tokens=add_special)
    token_strs = tokenizer.convert_ids_to_tokens(tokens) if return_token_strs else None
    return {"count": len(tokens), "max_model_len": ctx.engine.max_model_len, "tokens": tokens,
            "token_strs": token_strs}


def _tgi_tokens(ctx: ServerContext, body: TokenizeRequest) -> list[dict[str, Any]]:
    inputs = body.inputs or ""
    if not inputs:
        raise ValidationError("`inputs` cannot be empty", "inputs")
    add_special = True if body.add_special_tokens is None else body.add_special_tokens
    encoding = ctx.engine.tokenizer(inputs, add_special_tokens=add_special, return_offsets_mapping=True)
    return [{"id": token_id, "text": inputs[start:stop], "start": start, "stop": stop}
            for token_id, (start, stop) in zip(encoding["input_ids"], encoding["offset_mapping"])]
