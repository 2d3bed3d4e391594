"""text-generation-inference's API on the shared app:

    POST /generate          POST /generate_stream (SSE)       POST /  (dispatch on "stream")
    GET  /info              (POST /tokenize with {"inputs": ...}: tokenize.py)

/health, /metrics and the OpenAI routes are shared. At most max_concurrent_requests
generations are in flight on these routes; one more is a 429 (the edge's AdmissionLimit,
context.py, raises OverloadedError). With an API key set, the generation routes need `Authorization: Bearer
KEY` too (middleware.py; /info stays open)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pagedserve import __version__
from pagedserve.frontend.output_processor import OutputKind
from pagedserve.server.context import Admission, AdmissionLimit, ServerContext, off_loop
from pagedserve.server.errors import API, describe
from pagedserve.server.metrics import TGIMetrics
from pagedserve.server.request_body import parse_body, read_json
from pagedserve.server.streaming import SSEResponse
from pagedserve.server.tgi_generate import generate, generate_stream, start
from pagedserve.server.tgi_protocol import GenerateRequest, validate
from pagedserve.server.tgi_settings import TGISettings


def tgi_router(ctx: ServerContext, settings: TGISettings, metrics: TGIMetrics,
               admission: AdmissionLimit | None = None) -> APIRouter:
    """TGI's routes; `admission` is the edge's limit shared with the OpenAI routes (it also
    holds TGI's own max_concurrent_requests)."""
    router = APIRouter()
    shared = admission or AdmissionLimit(2**62, None, settings.max_concurrent_requests)

    async def handle(request: Request, force_stream: bool | None) -> Response:
        metrics.request_count += 1
        acquired: Admission | None = None
        try:
            body = parse_body(GenerateRequest, await read_json(request))
            stream = body.stream if force_stream is None else force_stream
            # tokenizing the inputs runs in a worker thread, off the event loop
            valid = await off_loop(validate, body, settings, ctx.engine.max_model_len, ctx.engine.tokenizer, stream)
            acquired = shared.admit(1, tgi=True)
            if stream:
                engine_stream = await start(ctx, valid, OutputKind.DELTA)
                held, acquired = acquired, None   # the stream's generator releases it
                return SSEResponse(generate_stream(ctx, valid, engine_stream, metrics, held.release))
            result = await generate(ctx, valid, request, metrics)
            # POST / answers a list, as the Inference API does; /generate one object
            return JSONResponse([result] if force_stream is None else result)
        except Exception as exc:
            return _fail(exc, metrics)
        finally:
            if acquired is not None:
                acquired.release()

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
            "model_dtype": settings.dtype, "model_device_type": ctx.engine.device_type,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": settings.max_concurrent_requests, "max_best_of": settings.max_best_of,
            "max_stop_sequences": settings.max_stop_sequences,
            "max_input_tokens": settings.input_limit(max_total_tokens), "max_total_tokens": max_total_tokens,
            "max_top_n_tokens": settings.max_top_n_tokens, "validation_workers": 1,
            "max_client_batch_size": settings.max_client_batch_size, "router": "pagedserve",
            "version": __version__, "sha": None, "docker_label": None}


def _fail(exc: BaseException, metrics: TGIMetrics) -> Response:
    error = describe(exc, API.TGI)
    metrics.observe_failure(error.type)
    return error.response()



