"""vLLM's runtime LoRA routes, served only when VLLM_ALLOW_RUNTIME_LORA_UPDATING is true (as in
vLLM: they read adapter folders named by the request) and the engine has enable_lora:

    POST /v1/load_lora_adapter    {"lora_name", "lora_path"}: checked against the model, then
                                  served under its name (a 400 naming lora_name if taken)
    POST /v1/unload_lora_adapter  {"lora_name"}: no longer served (a 404 if unknown); requests
                                  running with it finish
"""
from __future__ import annotations

import os

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict

from pagedserve.errors import ValidationError
from pagedserve.lora_request import LoRARequest
from pagedserve.server.context import ServerContext, off_loop
from pagedserve.server.errors import NotFoundError, error_response
from pagedserve.server.request_body import parse_body, read_json

ALLOW_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None   # vLLM's field; the name decides


def runtime_updates_allowed() -> bool:
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true")


def add_lora_routes(app: FastAPI, ctx: ServerContext) -> None:
    next_id = [max((lora.lora_int_id for lora in ctx.loras.values()), default=0) + 1]

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> Response:
        try:
            body = parse_body(LoadLoRAAdapterRequest, await read_json(request))
            if body.lora_name in ctx.loras or body.lora_name in ctx.served_model_names:
                raise ValidationError(f"The lora adapter '{body.lora_name}' has already been loaded.", "lora_name")
            lora = LoRARequest(body.lora_name, next_id[0], os.path.expanduser(body.lora_path))
            await off_loop(ctx.engine.engine.check_lora, lora)   # reads the folder: off the event loop
            next_id[0] += 1
            ctx.loras[lora.lora_name] = lora
            return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' added successfully.")
        except Exception as exc:
            return error_response(exc)

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> Response:
        try:
            body = parse_body(UnloadLoRAAdapterRequest, await read_json(request))
            if ctx.loras.pop(body.lora_name, None) is None:
                raise NotFoundError(f"The lora adapter '{body.lora_name}' cannot be found.", "lora_name")
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
        except Exception as exc:
            return error_response(exc)
