"""/openapi.json as the server really behaves: the routes read their bodies themselves
(request_body.py, so every error is ours, naming the field), which hides the bodies from
FastAPI's generator; this module publishes them, the pydantic request models, and the error
responses of each route family (errors.ERROR_STATUSES), so a schema fuzzer can drive the API."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from pagedserve.server.errors import API, ERROR_STATUSES, OpenAIErrorBody, TGIErrorBody, api_of

_REF = "#/components/schemas/{model}"


def document_openapi(app: FastAPI, request_bodies: dict[str, type[BaseModel]],
                     invocations: tuple[tuple[str, str], ...] = ()) -> None:
    """Make app.openapi() publish `request_bodies` (POST path -> model) and every route's
    error responses, and `POST /invocations` (a middleware, invisible to FastAPI) with its
    `invocations` (field, path) dispatch, its body one of those paths' models; the schema is
    built once, on first use."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _build(app, request_bodies)
            if invocations:
                app.openapi_schema["paths"]["/invocations"] = _invocations(request_bodies, invocations)
        return app.openapi_schema

    app.openapi = openapi   # type: ignore[method-assign]


def _invocations(request_bodies: dict[str, type[BaseModel]], routes: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    refs = {request_bodies[path].__name__: path for _, path in routes if path in request_bodies}
    dispatch = ", ".join(f"`{field}` -> {path}" for field, path in routes)
    return {"post": {
        "summary": "Invocations (SageMaker)", "operationId": "invocations",
        "description": f"Served by the route the body's first present field names: {dispatch}.",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "oneOf": [{"$ref": _REF.format(model=name)} for name in refs]}}}},
        "responses": {"200": {"description": "the chosen route's response"}, **_error_responses(api_of("/invocations"))},
    }}


def _build(app: FastAPI, request_bodies: dict[str, type[BaseModel]]) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    models = [*request_bodies.values(), OpenAIErrorBody, TGIErrorBody]
    _, defs = models_json_schema([(model, "validation") for model in models], ref_template=_REF)
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            model = request_bodies.get(path) if method == "post" else None
            if model is not None:
                operation["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}}
            if path not in ("/health", "/metrics", "/version", "/info", "/v1/models"):
                operation["responses"].update(_error_responses(api_of(path)))
    return schema


def _error_responses(api: API) -> dict[str, Any]:
    body = OpenAIErrorBody if api is API.OPENAI else TGIErrorBody
    content = {"application/json": {"schema": {"$ref": _REF.format(model=body.__name__)}}}
    return {str(status): {"description": description, "content": content}
            for status, description in ERROR_STATUSES[api].items()}
