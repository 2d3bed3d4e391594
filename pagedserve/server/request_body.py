"""Reading request bodies, for both API families: the JSON reader and the pydantic model
parser. Every problem becomes a pagedserve ValidationError naming the field, which
errors.py answers in the route family's body (400 OpenAI, 422 TGI)."""
from __future__ import annotations

import json
from typing import Any, TypeVar

import pydantic
from fastapi import Request
from pydantic import BaseModel

from pagedserve.errors import ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


async def read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ValidationError(f"the request body is not valid JSON: {exc}", None) from None


def parse_body(model: type[ModelT], body: Any) -> ModelT:
    """Validate a JSON body against `model`, then its check_supported() if it has one; the
    first problem becomes a ValidationError naming its field (e.g. `parameters.top_k`)."""
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object", None)
    try:
        request = model.model_validate(body)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"] if not _is_union_tag(part)) or None
        if error["type"] == "extra_forbidden":
            raise ValidationError(f"unknown or unsupported field {param!r}", param) from None
        if error["type"] == "missing":
            raise ValidationError(f"{param} is required", param) from None
        raise ValidationError(f"{param}: {error['msg']}", param) from None
    check = getattr(request, "check_supported", None)
    if check is not None:
        check()
    return request


def _is_union_tag(part: Any) -> bool:
    """pydantic puts the union member it tried into `loc` ('str', 'list[int]', ...)."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))
