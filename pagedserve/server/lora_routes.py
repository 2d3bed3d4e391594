"""vLLM's runtime LoRA routes, served only when VLLM_ALLOW_RUNTIME_LORA_UPDATING is true (as in
vLLM: they read adapter folders named by the request) and the engine has enable_lora:

    POST /v1/load_lora_adapter    {"lora_name", "lora_path"}: read whole and checked against the
                                  model (LLMEngine.add_lora: off the event loop and the engine
                                  thread; the engine never reads it again while it stays cached),
                                  then served under its name (a 400 naming lora_name if taken,
                                  being loaded by another request, or a name `model` resolves
                                  before adapters; a 400 naming lora_request if the folder is
                                  refused: running requests never notice)
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
from pagedserve.server.context import TGI_CLIENT_PLACEHOLDERS, ServerContext, off_loop
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


def reserved_model_names(served_model_names: tuple[str, ...] | list[str]) -> frozenset[str]:
    """The `model` names ServerContext.check_model resolves before any adapter (the served names
    and TGI clients' placeholders): an adapter named so could never be used."""
    return frozenset(served_model_names) | TGI_CLIENT_PLACEHOLDERS


def add_lora_routes(app: FastAPI, ctx: ServerContext) -> None:
    next_id = [max((lora.lora_int_id for lora in ctx.loras.values()), default=0) + 1]
    loading: set[str] = set()   # names whose load awaits its check (event loop only, as ctx.loras)

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> Response:
        try:
            body = parse_body(LoadLoRAAdapterRequest, await read_json(request))
            name = body.lora_name
            if not name:
                raise ValidationError("lora_name must be a non-empty string", "lora_name")
            if not body.lora_path:
                raise ValidationError("lora_path must be a non-empty string", "lora_path")
            if name in reserved_model_names(ctx.served_model_names):
                raise ValidationError(f"The lora adapter name '{name}' is reserved: a request naming it as `model` "
                                      "runs the base model", "lora_name")
            if name in ctx.loras or name in loading:
                raise ValidationError(f"The lora adapter '{name}' has already been loaded.", "lora_name")
            # the name and the id are taken before the check awaits: a concurrent load of the same
            # name is refused above, and every load gets an id of its own
            lora = LoRARequest(name, next_id[0], os.path.expanduser(body.lora_path))
            next_id[0] += 1
            loading.add(name)
            try:
                await off_loop(ctx.engine.engine.add_lora, lora)   # reads the folder: off the event loop
            finally:
                loading.discard(name)
            ctx.loras[name] = lora
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
