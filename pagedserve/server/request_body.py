"""Reading request bodies, for both API families: the JSON reader and the pydantic model
parser. Every problem becomes a pagedserve ValidationError naming the field, which
errors.py answers in the route family's body (400 OpenAI, 422 TGI).

The reader is the one place untrusted bytes become Python values, so it bounds them before
anything else sees them: nesting deeper than MAX_JSON_DEPTH and strings holding a lone UTF-16
surrogate ("\\ud800", which no tokenizer can encode) are rejected naming the field; bodies
over OFF_LOOP_BYTES are parsed in a worker thread so the event loop stays free."""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any, TypeVar

import pydantic
from fastapi import Request
from pydantic import BaseModel

from pagedserve.errors import ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)

MAX_JSON_DEPTH = 64            # objects/arrays inside each other; real requests nest < 10
OFF_LOOP_BYTES = 64 * 1024     # bodies larger than this are decoded in a worker thread
_SURROGATE = re.compile("[\ud800-\udfff]")


async def read_json(request: Request, check: bool = True) -> Any:
    """The body as JSON, checked by check_json_value unless `check` is false (the caller
    then checks it once it knows the route family). Raises ValidationError."""
    return await decode_json_off_loop(await request.body(), check)


async def decode_json_off_loop(raw: bytes, check: bool = True) -> Any:
    """decode_json, in a worker thread for bodies over OFF_LOOP_BYTES."""
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(decode_json, raw, check)
    return decode_json(raw, check)


def decode_json(raw: bytes, check: bool = True) -> Any:
    try:
        value = json.loads(raw)
    except RecursionError:
        raise ValidationError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", None) from None
    except UnicodeDecodeError:
        raise ValidationError("the request body is not valid UTF-8", None) from None
    except ValueError as exc:
        raise ValidationError(f"the request body is not valid JSON: {exc}", None) from None
    if check:
        check_json_value(value)
    return value


def check_json_value(value: Any) -> None:
    """Depth and string checks over a decoded body, iteratively (no recursion to exhaust);
    the error names the path of the offending value, e.g. `messages.0.content`."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                _raise_surrogate(path)
        elif isinstance(item, (dict, list)):
            if len(path) >= MAX_JSON_DEPTH:
                raise ValidationError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels",
                                      _param(path[:1]))
            if isinstance(item, dict):
                for key, child in item.items():
                    if _SURROGATE.search(key):
                        _raise_surrogate(path or ("the request body's keys",))   # never echo the key
                    if isinstance(child, (str, dict, list)):
                        stack.append((child, (*path, key)))
            else:
                stack.extend((child, (*path, i)) for i, child in enumerate(item)
                             if isinstance(child, (str, dict, list)))


def _raise_surrogate(path: tuple[Any, ...]) -> None:
    param = _param(path)
    raise ValidationError(f"{param or 'the request body'}: the string holds a lone UTF-16 surrogate "
                          "(an unpaired \\ud800-\\udfff escape), which is not valid Unicode text", param)


def _param(path: tuple[Any, ...]) -> str | None:
    return ".".join(str(part) for part in path) or None


def parse_body(model: type[ModelT], body: Any) -> ModelT:
    """Validate a JSON body against `model`, then its check_supported() if it has one; the
    first problem becomes a ValidationError naming its field (e.g. `parameters.top_k`)."""
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object", None)
    try:
        request = model.model_validate(body)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        param = _param(tuple(part for part in error["loc"] if not _is_union_tag(part)))
        if error["type"] == "extra_forbidden":
            raise ValidationError(f"unknown or unsupported field {param!r}", param) from None
        if error["type"] == "missing":
            raise ValidationError(f"{param} is required", param) from None
        message = error["msg"]
        if error["type"] == "finite_number":
            message = "must be a finite number (not Infinity or NaN)"
        raise ValidationError(f"{param}: {message}", param) from None
    check = getattr(request, "check_supported", None)
    if check is not None:
        check()
    return request


def _is_union_tag(part: Any) -> bool:
    """pydantic puts the union member it tried into `loc` ('str', 'list[int]', ...)."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))
