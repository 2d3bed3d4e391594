"""POST /v1/embeddings (OpenAI's, with vLLM's extras), and the app that serves an embedding model
(frontend/embedding_engine.py): /v1/embeddings, text-embeddings-inference's /embed (`inputs`,
`normalize`, `truncate`; a JSON array of vectors; errors in TGI's body), the scoring routes
(score.py: /score, /rerank and their /v1, /v2 spellings; a cross-encoder serves only those), /v1/models,
/tokenize and /detokenize (the generating server's own handlers, tokenize.py), /health, /version, /metrics. The
text-generation routes answer such a server with a 400 naming `model`, and a text-generation server answers
/v1/embeddings the same way (app.py), as vLLM does.

Every embedding, scoring and classification route races its work against the client's disconnect
(streaming.unless_disconnected, as the generating routes do): a client that leaves cancels its
request, whose inputs not yet run leave the engine's queue (AsyncEmbeddingEngine.embed), whose
tokenizing stops (process_stoppable) and whose admission is given back at once.

`input`: a string, a list of strings, a token id list or a list of those (at most
MAX_EMBEDDING_INPUTS); `encoding_format` "float" or "base64" (little-endian float32, as
OpenAI's client decodes it); `dimensions` at the model's own size, or shorter for a Matryoshka model
(its config's is_matryoshka / matryoshka_dimensions: the vector's first entries, normalised again); vLLM's
`truncate_prompt_tokens` and `add_special_tokens`."""
from __future__ import annotations

import base64
import struct
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedserve import __version__
from pagedserve.errors import ValidationError
from pagedserve.frontend.async_embedding_engine import AsyncEmbeddingEngine
from pagedserve.frontend.embedding_engine import shorten
from pagedserve.frontend.stoppable import until_stopped
from pagedserve.server.context import AdmissionLimit, ServerContext, ServerSettings, new_request_id
from pagedserve.server.app import add_admitted_route, add_health_routes
from pagedserve.server.invocations import EMBEDDING_ROUTES, InvocationsMiddleware
from pagedserve.server.errors import API, error_response, http_exception
from pagedserve.server.middleware import APIKeyMiddleware, BodySizeLimitMiddleware
from pagedserve.server.openai_models import models_response
from pagedserve.server.openapi_docs import document_openapi
from pagedserve.server.openai_protocol import _Strict
from pagedserve.server.request_body import parse_body, read_json
from pagedserve.server.score import (ClassifyRequest, PredictRequest, RerankRequest, ScoreRequest, TEIRerankRequest,
                                     create_classification, create_rerank, create_score, create_tei_prediction,
                                     create_tei_rerank, rerank_body)
from pagedserve.server.streaming import unless_disconnected
from pagedserve.server.tokenize import DetokenizeRequest, TokenizeRequest, detokenize, tokenize

MAX_EMBEDDING_INPUTS = 2048   # OpenAI's cap on `input` entries
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/generate", "/generate_stream", "/")


class EmbeddingRequest(_Strict):
    input: Union[str, list[str], list[int], list[list[int]]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None   # vLLM: keep k tokens (-1: max_model_len)
    add_special_tokens: bool = True             # vLLM
    request_id: str | None = None               # vLLM
    priority: int = Field(default=0)            # vLLM's field; no scheduler here: only 0

    def inputs(self) -> list[str | list[int]]:
        return _input_list(self.input, "input")

    def check_supported(self) -> None:
        if self.priority != 0:
            raise ValidationError("priority is not supported for embeddings (no scheduling policy here)", "priority")


class EmbedRequest(_Strict):
    """text-embeddings-inference's POST /embed (HF's embedding server): a JSON array of vectors back."""

    inputs: Union[str, list[str], list[int], list[list[int]]]
    normalize: bool = True
    truncate: bool = False
    truncation_direction: Literal["right", "Right"] = "right"   # TEI's "left" is not supported
    prompt_name: None = None   # sentence-transformers prompts: not supported
    dimensions: int | None = None

    def inputs_list(self) -> list[str | list[int]]:
        return _input_list(self.inputs, "inputs")


def _input_list(value: str | list, name: str) -> list[str | list[int]]:
    """One text or token id list, or a non-empty list of up to MAX_EMBEDDING_INPUTS of them."""
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
        return [value]
    if not value:
        raise ValidationError(f"{name} must not be empty", name)
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise ValidationError(f"{name} supports up to {MAX_EMBEDDING_INPUTS} entries; given {len(value)}", name)
    return list(value)


class EmbeddingMetrics:
    """vLLM-named counters for an embedding server (its own registry)."""

    def __init__(self, engine: AsyncEmbeddingEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        self.prompt_tokens = Counter("pagedserve:prompt_tokens", "Number of prefill tokens processed.",
                                     labelnames=list(labels), registry=self.registry).labels(**labels)
        self.requests = Counter("pagedserve:request_success", "Count of successfully processed requests.",
                                labelnames=list(labels), registry=self.registry).labels(**labels)
        self.latency = Histogram("pagedserve:e2e_request_latency_seconds", "Histogram of e2e request latency.",
                                 labelnames=list(labels), registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)).labels(**labels)
        waiting = Gauge("pagedserve:num_requests_waiting", "Inputs waiting to be embedded.", labelnames=list(labels),
                        registry=self.registry).labels(**labels)
        waiting.set_function(lambda: engine.num_waiting)

    def observe(self, started: float, num_tokens: int) -> None:
        """One successful request (embeddings, scores, classes) that ran `num_tokens` tokens,
        begun at time.monotonic() `started`."""
        self.prompt_tokens.inc(num_tokens)
        self.requests.inc()
        self.latency.observe(time.monotonic() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def create_embedding(ctx: ServerContext, request: EmbeddingRequest, metrics: EmbeddingMetrics) -> Response:
    ctx.check_model(request.model)
    _not_cross_encoder(ctx)
    process_prompt = ctx.engine.engine.process_prompt
    id_lists, vectors = await _embed(ctx, metrics, request.inputs(), request.dimensions, lambda item: process_prompt(
        item, request.truncate_prompt_tokens, request.add_special_tokens, "input"))
    response_id, _ = new_request_id("embd", request.request_id)
    data = [{"object": "embedding", "index": i,
             "embedding": _base64(vector) if request.encoding_format == "base64" else vector}
            for i, vector in enumerate(vectors)]
    num_tokens = sum(len(ids) for ids in id_lists)
    return JSONResponse({"id": response_id, "object": "list", "created": int(time.time()), "model": ctx.model_name,
                         "data": data, "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}})


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _not_cross_encoder(ctx: ServerContext) -> None:
    if ctx.engine.engine.is_classifier:
        raise ValidationError(f"the model {ctx.model_name!r} is a sequence classifier: it serves /classify (and with "
                              "one label /score and /rerank) and has no embeddings", "model")


async def create_tei_embedding(ctx: ServerContext, request: EmbedRequest, metrics: EmbeddingMetrics) -> Response:
    _not_cross_encoder(ctx)
    limit, truncate = ctx.engine.max_model_len, request.truncate

    def process(item: str | list[int]) -> list[int]:
        if isinstance(item, list) and truncate:   # the first max_model_len tokens (TEI's right side)
            item = item[:limit]
        return ctx.engine.engine.process_prompt(item, -1 if truncate else None, True, "inputs", '"truncate": true')

    _, vectors = await _embed(ctx, metrics, request.inputs_list(), request.dimensions, process, request.normalize)
    return JSONResponse(vectors)


async def _embed(ctx: ServerContext, metrics: EmbeddingMetrics, inputs: list[str | list[int]], dimensions: int | None,
                 process: Callable[[str | list[int]], list[int]], normalize: bool | None = None
                 ) -> tuple[list[list[int]], list[list[float]]]:
    """Both routes' work: `dimensions` checked, each input made token ids by `process` (in the
    tokenizing pool), embedded, counted in the metrics. Returns (token ids, vectors)."""
    started = time.monotonic()
    engine: AsyncEmbeddingEngine = ctx.engine   # type: ignore[assignment]
    engine.engine.check_dimensions(dimensions)
    id_lists = await engine.process_stoppable(lambda stop: [process(item) for item in until_stopped(inputs, stop)])
    vectors = await engine.embed(id_lists, normalize)
    if dimensions is not None and dimensions != engine.engine.dimensions:   # a Matryoshka model's prefix
        renormalize = engine.engine.runner.pooling.normalize if normalize is None else normalize
        vectors = [shorten(vector, dimensions, renormalize) for vector in vectors]
    metrics.observe(started, sum(len(ids) for ids in id_lists))
    return id_lists, vectors


def build_embedding_app(engine: AsyncEmbeddingEngine, settings: ServerSettings) -> FastAPI:
    """An app serving an embedding model; its lifespan ends with engine.shutdown()."""
    ctx = ServerContext(engine, settings)   # type: ignore[arg-type]
    metrics = EmbeddingMetrics(engine, settings.served_model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()

    app = FastAPI(title="pagedserve", version=__version__, lifespan=lifespan)
    app.state.ctx = ctx
    app.add_exception_handler(StarletteHTTPException, http_exception)   # type: ignore[arg-type]
    # inputs in flight: one full request beyond max_num_seqs + --max-waiting-requests (each input
    # is at most max_model_len tokens, so the ids held stay bounded); past it a 503 with Retry-After
    admission = AdmissionLimit(MAX_EMBEDDING_INPUTS + engine.engine.max_num_seqs + settings.max_waiting_requests,
                               settings.max_concurrent_requests)

    def add_route(path: str, body_model: type, count: Callable[[Any], int],
                  create: Callable[[ServerContext, Any, EmbeddingMetrics], Awaitable[Response]],
                  api: API = API.OPENAI) -> None:
        """An admitted route whose work ends when its client leaves (unless_disconnected)."""
        add_admitted_route(app, path, body_model, admission, count,
                           lambda body, request: unless_disconnected(create(ctx, body, metrics), request), api)

    add_route("/v1/embeddings", EmbeddingRequest, lambda body: len(body.inputs()), create_embedding)
    add_route("/embed", EmbedRequest, lambda body: len(body.inputs_list()), create_tei_embedding, API.TGI)
    for path in ("/score", "/v1/score"):
        add_route(path, ScoreRequest, lambda body: len(body.pairs()), create_score)
    for path in ("/v1/rerank", "/v2/rerank"):
        add_route(path, RerankRequest, lambda body: len(body.pairs()), create_rerank)
    add_route("/classify", ClassifyRequest, lambda body: len(body.inputs()), create_classification)
    add_route("/predict", PredictRequest, lambda body: len(body.inputs_list()), create_tei_prediction, API.TGI)

    @app.post("/rerank")   # Jina's / Cohere's body, or TEI's (it holds `texts`): answered in its own API's
    async def rerank(request: Request) -> Response:
        # a body that is not even JSON is answered as TEI's if it names `texts`
        api = API.TGI if b'"texts"' in await request.body() else API.OPENAI
        try:
            raw = await read_json(request)
            kind = rerank_body(raw)
            api = API.TGI if kind is TEIRerankRequest else API.OPENAI
            body = parse_body(kind, raw)
            respond = create_tei_rerank if kind is TEIRerankRequest else create_rerank
            return await admission.admit(len(body.pairs())).respond(
                lambda: unless_disconnected(respond(ctx, body, metrics), request))
        except Exception as exc:
            return error_response(exc, api)

    for path in GENERATION_ROUTES:
        app.add_api_route(path, _not_generative(ctx), methods=["POST"])

    @app.get("/v1/models")
    async def models() -> Response:
        return models_response(ctx)

    add_health_routes(app, engine, metrics)

    # the generating server's /tokenize and /detokenize (vLLM's bodies, TGI's `inputs`): a prompt of
    # any length is counted (max_model_len beside it), as vLLM's are
    for path, handler, verb, param in (("/tokenize", tokenize, "tokenizing", "prompt"),
                                       ("/detokenize", detokenize, "detokenizing", "tokens")):
        app.post(path)(_needs_tokenizer(ctx, handler, verb, param))

    document_openapi(app, {"/v1/embeddings": EmbeddingRequest, "/embed": EmbedRequest, "/score": ScoreRequest,
                           "/v1/score": ScoreRequest, "/v1/rerank": RerankRequest, "/v2/rerank": RerankRequest,
                           "/rerank": RerankRequest, "/classify": ClassifyRequest, "/predict": PredictRequest,
                           "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest},
                     invocations=EMBEDDING_ROUTES)
    app.add_middleware(InvocationsMiddleware, routes=EMBEDDING_ROUTES)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    return app


def _not_generative(ctx: ServerContext) -> Any:
    async def route(request: Request) -> Response:
        return error_response(ValidationError(
            f"the model {ctx.model_name!r} is an embedding model: it serves /v1/embeddings, not "
            f"{request.url.path}", "model"))
    return route


def _needs_tokenizer(ctx: Any, handler: Any, verb: str, param: str) -> Any:
    """A /tokenize or /detokenize route: the handler, or a 400 naming `param` without a tokenizer."""
    async def route(request: Request) -> Response:
        if ctx.engine.tokenizer is None:
            return error_response(ValidationError(f"{verb} needs a tokenizer (skip_tokenizer_init is set)", param))
        return await handler(ctx, request)
    return route
