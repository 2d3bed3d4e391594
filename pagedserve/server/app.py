"""The FastAPI app: routes wired to their handlers, middleware, and JSON errors for
everything (unknown routes included).

    POST /v1/completions        POST /v1/chat/completions     GET /v1/models
    GET  /health                GET  /version                 GET /metrics
    POST /tokenize              POST /detokenize
and text-generation-inference's routes (tgi_routes.py): POST /generate, /generate_stream, /;
GET /info; POST /tokenize with {"inputs": ...} answers in TGI's shape.
"""
from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedserve import __version__
from pagedserve.errors import ValidationError
from pagedserve.frontend.async_engine import AsyncEngine
from pagedserve.server.context import ServerContext, ServerSettings
from pagedserve.server.errors import (HTTPError, MethodNotAllowedError, NotFoundError, ServiceUnavailableError,
                                      error_response)
from pagedserve.server.metrics import CONTENT_TYPE, ServerMetrics
from pagedserve.server.middleware import APIKeyMiddleware, BodySizeLimitMiddleware
from pagedserve.server.openai_chat import create_chat_completion
from pagedserve.server.openai_completions import create_completion
from pagedserve.server.openai_protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                               TokenizeRequest, parse_request)
from pagedserve.server.tgi_routes import tgi_router, tgi_tokenize
from pagedserve.server.tgi_settings import TGISettings

logger = logging.getLogger(__name__)


def build_app(engine: AsyncEngine, settings: ServerSettings, tgi_settings: TGISettings | None = None) -> FastAPI:
    """An app serving `engine`; the app's lifespan ends with engine.shutdown()."""
    ctx = ServerContext(engine, settings)
    metrics = ServerMetrics(engine, settings.served_model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="pagedserve", version=__version__, lifespan=lifespan)
    app.state.ctx = ctx
    app.state.metrics = metrics
    app.add_exception_handler(StarletteHTTPException, _http_exception)   # type: ignore[arg-type]
    _add_openai_routes(app, ctx)
    _add_info_routes(app, ctx, metrics)
    app.include_router(tgi_router(ctx, tgi_settings or TGISettings(), metrics.tgi))
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)   # outermost: before the body is read
    return app


async def _http_exception(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 404:
        error: HTTPError = NotFoundError(f"no route for {request.method} {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}")
    else:
        error = HTTPError(str(exc.detail))
        error.status = exc.status_code   # type: ignore[assignment]
    return error_response(error)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ValidationError(f"the request body is not valid JSON: {exc}", None) from None


def _add_openai_routes(app: FastAPI, ctx: ServerContext) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            body = parse_request(CompletionRequest, await _json_body(request))
            return await create_completion(ctx, body, request)
        except Exception as exc:
            return error_response(exc)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            body = parse_request(ChatCompletionRequest, await _json_body(request))
            return await create_chat_completion(ctx, body, request)
        except Exception as exc:
            return error_response(exc)

    @app.get("/v1/models")
    async def models() -> Response:
        card = {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "pagedserve",
                "root": ctx.settings.model_root or ctx.model_name, "parent": None,
                "max_model_len": ctx.engine.max_model_len,
                "permission": [{"id": f"modelperm-{ctx.model_name}", "object": "model_permission",
                                "created": ctx.created, "allow_create_engine": False, "allow_sampling": True,
                                "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                                "allow_fine_tuning": False, "organization": "*", "group": None,
                                "is_blocking": False}]}
        return JSONResponse({"object": "list", "data": [card]})


def _add_info_routes(app: FastAPI, ctx: ServerContext, metrics: ServerMetrics) -> None:
    @app.get("/health")
    async def health() -> Response:
        if ctx.engine.is_healthy:
            return Response(status_code=200)
        return error_response(ServiceUnavailableError("the engine is dead; restart the server"))

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        try:
            raw = await _json_body(request)
            if isinstance(raw, dict) and "inputs" in raw:   # TGI's body (vLLM's has prompt or messages)
                return await tgi_tokenize(ctx, raw, request)
            body = parse_request(TokenizeRequest, raw)
            return JSONResponse(_tokenize(ctx, body))
        except Exception as exc:
            return error_response(exc)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        try:
            body = parse_request(DetokenizeRequest, await _json_body(request))
            ctx.check_model(body.model)
            vocab = len(ctx.engine.tokenizer)
            bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValidationError(f"token id {bad} is out of vocabulary (size {vocab})", "tokens")
            return JSONResponse({"prompt": ctx.decode(body.tokens)})
        except Exception as exc:
            return error_response(exc)


def _tokenize(ctx: ServerContext, body: TokenizeRequest) -> dict[str, Any]:
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise ValidationError("give exactly one of prompt and messages", "prompt")
    if body.messages is not None:
        text = ctx.engine.render_chat([m.as_template_message() for m in body.messages],
                                      body.chat_template or ctx.settings.chat_template, body.add_generation_prompt,
                                      body.continue_final_message)
        add_special = bool(body.add_special_tokens)   # the template already has them
    else:
        text = body.prompt or ""
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
    tokenizer = ctx.engine.tokenizer
    tokens = tokenizer.encode(text, add_special_tokens=add_special)
    token_strs = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    return {"count": len(tokens), "max_model_len": ctx.engine.max_model_len, "tokens": tokens,
            "token_strs": token_strs}
