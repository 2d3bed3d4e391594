"""GET /v1/models (one card per served name: --served-model-name may give several, the first
is the one responses report) and GET /tokenizer_info (vLLM's shape: the tokenizer's class,
its JSON-safe init settings and the chat template in use; behind the API key)."""
from __future__ import annotations

import json
import time
from typing import Any

from fastapi.responses import JSONResponse, Response

from pagedserve.server.context import ServerContext


def models_response(ctx: ServerContext) -> Response:
    created = int(time.time())
    root = ctx.settings.model_root or ctx.model_name
    cards = [{"id": name, "object": "model", "created": created, "owned_by": "pagedserve", "root": root,
              "parent": None, "max_model_len": ctx.engine.max_model_len,
              "permission": [{"id": f"modelperm-{name}", "object": "model_permission", "created": created,
                              "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                              "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                              "organization": "*", "group": None, "is_blocking": False}]}
             for name in ctx.served_model_names]
    # LoRA adapters (--lora-modules), as vLLM lists them: their path as root, the base as parent
    cards += [{"id": lora.lora_name, "object": "model", "created": created, "owned_by": "pagedserve",
               "root": lora.lora_path, "parent": ctx.model_name, "max_model_len": ctx.engine.max_model_len,
               "permission": cards[0]["permission"]} for lora in list(ctx.loras.values())]
    return JSONResponse({"object": "list", "data": cards})


def tokenizer_info(ctx: ServerContext) -> dict[str, Any]:
    tokenizer = ctx.engine.tokenizer
    info: dict[str, Any] = {"tokenizer_class": type(tokenizer).__name__}
    for key, value in getattr(tokenizer, "init_kwargs", {}).items():
        if _json_safe(value):
            info[key] = value
    info["chat_template"] = ctx.settings.chat_template or getattr(tokenizer, "chat_template", None)
    return info


def tokenizer_info_response(ctx: ServerContext) -> Response:
    return JSONResponse(tokenizer_info(ctx))


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
