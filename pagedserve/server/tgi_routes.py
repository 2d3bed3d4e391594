"""text-generation-inference's API on the shared app:

    POST /generate          POST /generate_stream (SSE)       POST /  (dispatch on "stream")
    GET  /info              POST /tokenize with {"inputs": ...} (app.py routes bodies with
                            "prompt"/"messages" to the vLLM-shaped tokenizer instead)

/health, /metrics and the OpenAI routes are shared. At most max_concurrent_requests
generations are in flight on these routes; one more is a 429 (TGI's semaphore). With an
API key set, these routes need `Authorization: Bearer KEY` too (except /info)."""
from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pagedserve import __version__
from pagedserve.frontend.output_processor import OutputKind
from pagedserve.server.context import ServerContext
from pagedserve.server.metrics import TGIMetrics
from pagedserve.server.streaming import SSEResponse
from pagedserve.server.tgi_generate import generate, generate_stream, start
from pagedserve.server.tgi_protocol import (GenerateRequest, TGIError, TokenizeRequest, classify, error_response,
                                            overloaded, parse, validate)
from pagedserve.server.tgi_settings import TGISettings


class ConcurrencyLimit:
    """In-flight TGI generations (event loop only): acquire() fails instead of waiting."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def acquire(self) -> None:
        if self.in_flight >= self.limit:
            raise overloaded()
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


def tgi_router(ctx: ServerContext, settings: TGISettings, metrics: TGIMetrics) -> APIRouter:
    router = APIRouter()
    limit = ConcurrencyLimit(settings.max_concurrent_requests)

    async def handle(request: Request, force_stream: bool | None) -> Response:
        metrics.request_count += 1
        acquired = False
        try:
            _check_auth(ctx, request)
            body = parse(GenerateRequest, await _json_body(request))
            stream = body.stream if force_stream is None else force_stream
            valid = validate(body, settings, ctx.engine.max_model_len, ctx.engine.tokenizer, stream)
            limit.acquire()
            acquired = True
            if stream:
                engine_stream = await start(ctx, valid, OutputKind.DELTA)
                acquired = False   # the stream's generator releases it
                return SSEResponse(generate_stream(ctx, valid, engine_stream, metrics, limit.release))
            result = await generate(ctx, valid, request, metrics)
            # POST / answers a list, as the Inference API does; /generate one object
            return JSONResponse([result] if force_stream is None else result)
        except Exception as exc:
            return _fail(exc, metrics)
        finally:
            if acquired:
                limit.release()

    @router.post("/generate")
    async def generate_route(request: Request) -> Response:
        return await handle(request, False)

    @router.post("/generate_stream")
    async def generate_stream_route(request: Request) -> Response:
        return await handle(request, True)

    @router.post("/")
    async def compat_generate(request: Request) -> Response:
        return await handle(request, None)

    @router.get("/info")
    async def info() -> Response:
        return JSONResponse(info_body(ctx, settings))

    return router


def info_body(ctx: ServerContext, settings: TGISettings) -> dict[str, Any]:
    max_total_tokens = ctx.engine.max_model_len
    return {"model_id": settings.model_id or ctx.settings.model_root or ctx.model_name, "model_sha": None,
            "model_dtype": settings.dtype, "model_device_type": _device_type(ctx),
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": settings.max_concurrent_requests, "max_best_of": settings.max_best_of,
            "max_stop_sequences": settings.max_stop_sequences,
            "max_input_tokens": settings.input_limit(max_total_tokens), "max_total_tokens": max_total_tokens,
            "max_top_n_tokens": settings.max_top_n_tokens, "validation_workers": 1,
            "max_client_batch_size": settings.max_client_batch_size, "router": "pagedserve",
            "version": __version__, "sha": None, "docker_label": None}


async def tgi_tokenize(ctx: ServerContext, body: Any, request: Request) -> Response:
    """TGI's /tokenize: [{"id", "text", "start", "stop"}] with character offsets into inputs."""
    try:
        _check_auth(ctx, request)
        parsed = parse(TokenizeRequest, body)
        if not parsed.inputs:
            raise TGIError("`inputs` cannot be empty")
        encoding = ctx.engine.tokenizer(parsed.inputs, add_special_tokens=parsed.add_special_tokens,
                                        return_offsets_mapping=True)
        tokens = [{"id": token_id, "text": parsed.inputs[start:stop], "start": start, "stop": stop}
                  for token_id, (start, stop) in zip(encoding["input_ids"], encoding["offset_mapping"])]
        return JSONResponse(tokens)
    except Exception as exc:
        return error_response(classify(exc))


def _fail(exc: BaseException, metrics: TGIMetrics) -> Response:
    error = classify(exc)
    if error.error_type != "authentication":
        metrics.observe_failure(error.error_type)
    return error_response(error)


def _check_auth(ctx: ServerContext, request: Request) -> None:
    api_key = ctx.settings.api_key
    if not api_key:
        return
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
        raise TGIError("missing or invalid API key: send `Authorization: Bearer <key>`", "authentication", 401)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise TGIError(f"Failed to parse the request body as JSON: {exc}") from None


def _device_type(ctx: ServerContext) -> str | None:
    config = getattr(ctx.engine.engine, "config", None)
    device = getattr(getattr(config, "device", None), "device", None)
    return None if device is None else str(getattr(device, "type", device))

