"""The FastAPI app: routes wired to their handlers, middleware, and JSON errors for
everything (unknown routes included).

    POST /v1/completions        POST /v1/chat/completions     GET /v1/models
    GET  /health                GET  /version                 GET /metrics
    GET|POST /ping, POST /invocations   SageMaker's: /health, and any route by its body (invocations.py)
    GET  /debug/steps           the engine's step timing (frontend/step_timing.py); ?reset=1 restarts it,
                                ?raw=N adds the last N steps (behind the API key, as /debug/*)
    POST /tokenize              POST /detokenize              POST /v1/embeddings (a 400: embeddings.py serves those)
and text-generation-inference's routes (tgi_routes.py): POST /generate, /generate_stream, /;
GET /info; POST /tokenize with {"inputs": ...} answers in TGI's shape (tokenize.py).
The live dashboard (GET /dashboard and its stream): dashboard.py.
Errors: errors.py (one table, both bodies); auth and body size: middleware.py; admission
(both APIs, 503/429 with Retry-After beyond it): context.AdmissionLimit; /openapi.json's
request bodies and error responses: openapi_docs.py.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedserve import __version__
from pagedserve.errors import ValidationError
from pagedserve.frontend.async_engine import CPU_SAMPLE_S, AsyncEngine
from pagedserve.server.context import AdmissionLimit, ServerContext, ServerSettings
from pagedserve.server.dashboard import DashboardHub, add_dashboard_routes
from pagedserve.server.errors import (API, ServiceUnavailableError, error_response, http_exception,
                                      request_validation_error)
from pagedserve.server.invocations import GENERATE_ROUTES, InvocationsMiddleware
from pagedserve.server.metrics import CONTENT_TYPE, ServerMetrics
from pagedserve.server.middleware import APIKeyMiddleware, BodySizeLimitMiddleware
from pagedserve.server.openai_chat import create_chat_completion
from pagedserve.server.openai_completions import create_completion
from pagedserve.server.openai_models import models_response, tokenizer_info_response
from pagedserve.server.openapi_docs import document_openapi
from pagedserve.server.openai_protocol import ChatCompletionRequest, CompletionRequest
from pagedserve.server.lora_routes import add_lora_routes, runtime_updates_allowed
from pagedserve.server.openai_responses import ResponsesRequest, create_response
from pagedserve.server.request_body import parse_body, read_json
from pagedserve.server.tgi_routes import tgi_router
from pagedserve.server.tgi_protocol import GenerateRequest
from pagedserve.server.tgi_settings import TGISettings
from pagedserve.server.tokenize import DetokenizeRequest, TokenizeRequest, detokenize, tokenize

logger = logging.getLogger(__name__)


def build_app(engine: AsyncEngine, settings: ServerSettings, tgi_settings: TGISettings | None = None) -> FastAPI:
    """An app serving `engine`; the app's lifespan ends with engine.shutdown()."""
    ctx = ServerContext(engine, settings)
    metrics = ServerMetrics(engine, settings.served_model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sampler = asyncio.ensure_future(_sample_loop_cpu(engine))
        yield
        sampler.cancel()
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="pagedserve", version=__version__, lifespan=lifespan)
    app.state.ctx = ctx
    app.state.metrics = metrics
    app.add_exception_handler(StarletteHTTPException, http_exception)   # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, request_validation_error)   # type: ignore[arg-type]
    tgi_settings = tgi_settings or TGISettings()
    admission = AdmissionLimit(engine.max_num_seqs + settings.max_waiting_requests, settings.max_concurrent_requests,
                               tgi_settings.max_concurrent_requests)
    _add_openai_routes(app, ctx, admission)
    _add_info_routes(app, ctx, metrics)
    app.include_router(tgi_router(ctx, tgi_settings, metrics.tgi, admission))
    if runtime_updates_allowed() and engine.engine.config.scheduler.lora is not None:
        add_lora_routes(app, ctx)
    add_dashboard_routes(app, DashboardHub(engine, settings.served_model_name), settings.dashboard_results_dir)
    document_openapi(app, {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
                           "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest,
                           "/generate": GenerateRequest, "/generate_stream": GenerateRequest, "/": GenerateRequest},
                     invocations=GENERATE_ROUTES)
    app.add_middleware(InvocationsMiddleware, routes=GENERATE_ROUTES)   # inside the size limit and the key
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)   # outermost: before the body is read
    return app


async def _sample_loop_cpu(engine: AsyncEngine) -> None:
    """The event loop thread's CPU time, for the step timer's busy fraction."""
    while True:
        engine.step_timer.sample_cpu("event_loop")
        await asyncio.sleep(CPU_SAMPLE_S)


def add_admitted_route(app: FastAPI, path: str, body_model: type, admission: AdmissionLimit,
                       count: Callable[[Any], int], respond: Callable[[Any, Request], Awaitable[Response]],
                       api: API = API.OPENAI) -> None:
    """POST `path`: the body parsed as `body_model`, admitted for count(body) engine requests
    (held until the response is sent), answered by respond(body, request); any error in `api`'s
    body. This app's OpenAI routes and the embedding app's routes (embeddings.py)."""
    async def route(request: Request) -> Response:
        try:
            body = parse_body(body_model, await read_json(request))
            return await admission.admit(count(body)).respond(lambda: respond(body, request))
        except Exception as exc:
            return error_response(exc, api)

    app.add_api_route(path, route, methods=["POST"])


def _add_openai_routes(app: FastAPI, ctx: ServerContext, admission: AdmissionLimit) -> None:
    add_admitted_route(app, "/v1/completions", CompletionRequest, admission, lambda body: len(body.prompts()),
                       lambda body, request: create_completion(ctx, body, request))
    add_admitted_route(app, "/v1/chat/completions", ChatCompletionRequest, admission, lambda body: 1,
                       lambda body, request: create_chat_completion(ctx, body, request))
    add_admitted_route(app, "/v1/responses", ResponsesRequest, admission, lambda body: 1,
                       lambda body, request: create_response(ctx, body, request))

    async def embeddings(request: Request) -> Response:   # served by an embedding model's app (embeddings.py)
        return error_response(ValidationError(f"the model {ctx.model_name!r} generates text: {request.url.path} needs "
                                              "an embedding model or a cross-encoder (a decoder serves embeddings "
                                              "under --runner pooling)", "model"))

    for path in ("/v1/embeddings", "/score", "/v1/score", "/v1/rerank", "/v2/rerank", "/rerank", "/classify",
                 "/predict"):
        app.add_api_route(path, embeddings, methods=["POST"])

    @app.get("/v1/models")
    async def models() -> Response:
        return models_response(ctx)

    @app.get("/tokenizer_info")
    async def tokenizer_info_route() -> Response:
        return tokenizer_info_response(ctx)


def add_health_routes(app: FastAPI, engine: Any, metrics: Any) -> None:
    """/health and /ping (503 once `engine.is_healthy` is false), /version, /metrics (`metrics.render()`):
    this app's and the embedding app's (embeddings.py)."""
    async def health() -> Response:
        if engine.is_healthy:
            return Response(status_code=200)
        return error_response(ServiceUnavailableError("the engine is dead; restart the server"))
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ping", health, methods=["GET", "POST"])   # SageMaker's health check (vLLM, TGI)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)


def _add_info_routes(app: FastAPI, ctx: ServerContext, metrics: ServerMetrics) -> None:
    add_health_routes(app, ctx.engine, metrics)

    @app.get("/debug/steps")
    async def step_timing(reset: bool = False, raw: int = Query(0, ge=0)) -> Response:
        summary = ctx.engine.step_timer.summary()
        if raw > 0:   # the last `raw` steps: [begin, end, tokens, running, deliver_s]
            summary["raw"] = ctx.engine.step_timer.raw(raw)
        if reset:
            ctx.engine.step_timer.reset()
        return JSONResponse(summary)

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> Response:
        return await tokenize(ctx, request)

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> Response:
        return await detokenize(ctx, request)
