"""The one translation from each API's structured-output fields to StructuredOutputsParams.

    OpenAI (/v1/completions, /v1/chat/completions):
        response_format {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}
            (and TGI's chat shape {"type": "json" | "json_object" | "regex" | "json_schema", "value": ...})
        structured_outputs {"json" | "regex" | "choice" | "grammar" | "json_object": ...}   (vLLM)
        guided_json / guided_regex / guided_choice / guided_grammar                       (older vLLM)
    TGI (/generate, /generate_stream, /):
        parameters.grammar {"type": "json" | "json_object" | "regex" | "json_schema", "value": ...}

A request carries at most one constraint; two are a 400 naming both fields. Every error names
the request's own field (e.g. `response_format.json_schema.schema`, `guided_regex`,
`parameters.grammar`): shape errors here, and the engine's compile errors (named `json`,
`regex`, ... by the engine) through `naming()` around the engine's add_request, and the
errors of a grammar found to have no way on mid-generation through `named_streams()`."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

from pagedserve.errors import ValidationError
from pagedserve.sampling_params import StructuredOutputsParams

KINDS = tuple(f.name for f in fields(StructuredOutputsParams))   # json, regex, choice, grammar, json_object
# what the engine (and StructuredOutputsParams) name their errors
_ENGINE_PARAMS = frozenset(KINDS) | {"structured_outputs"}
# vLLM's structured_outputs options that do not change a constraint's language here:
# accepted at their neutral value only
_NEUTRAL_OPTIONS: dict[str, tuple] = {"disable_fallback": (False, None), "disable_any_whitespace": (False, None),
                                      "disable_additional_properties": (False, None),
                                      "whitespace_pattern": (None,), "structural_tag": (None,),
                                      "backend": (None,)}
_JSON_SCHEMA_KEYS = ("name", "schema", "strict", "description")


@dataclass(frozen=True)
class Constraint:
    """One request's constraint and the request field it came from (named in its errors)."""

    params: StructuredOutputsParams
    field: str

    def error(self, exc: ValidationError) -> ValidationError:
        return _named(exc, self.field)


_ENGINE_PREFIX = re.compile(r"^structured_outputs(\.\w+)?: ")   # how the engine's messages begin


def _named(exc: ValidationError, field: str) -> ValidationError:
    """`exc` under the request's field: "guided_json: invalid JSON schema: ...", not
    "guided_json: structured_outputs.json: invalid JSON schema: ..."."""
    message = _ENGINE_PREFIX.sub("", exc.message)
    return ValidationError(message if message.startswith(field) else f"{field}: {message}", field)


@contextmanager
def naming(constraint: Constraint | None) -> Iterator[None]:
    """Re-raise the engine's compile errors (an invalid schema, regex or grammar) under the
    request's own field name; other errors pass unchanged."""
    try:
        yield
    except ValidationError as exc:
        if constraint is None or exc.param not in _ENGINE_PARAMS:
            raise
        raise constraint.error(exc) from None


class NamedStream:
    """A request stream whose errors name the request's own field like naming()'s: a grammar
    with no way on is found mid-generation (the core fails the request with a ValidationError
    naming structured_outputs). The stream's other attributes are the stream's."""

    def __init__(self, stream: Any, constraint: Constraint) -> None:
        self.stream, self.constraint = stream, constraint

    def __aiter__(self) -> "NamedStream":
        return self

    async def __anext__(self) -> Any:
        with naming(self.constraint):
            return await self.stream.__anext__()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def named_streams(streams: list[Any], constraint: Constraint | None) -> list[Any]:
    return streams if constraint is None else [NamedStream(stream, constraint) for stream in streams]


def _build(field: str, **kwargs: Any) -> Constraint:
    try:
        return Constraint(StructuredOutputsParams(**kwargs), field)
    except ValidationError as exc:
        raise _named(exc, field) from None


# --- OpenAI ---------------------------------------------------------------------------------

def from_openai(request: Any) -> Constraint | None:
    """The constraint of an OpenAI request (completions or chat), or None."""
    found: list[Constraint] = []
    if request.response_format is not None:
        constraint = _response_format(request.response_format)
        if constraint is not None:
            found.append(constraint)
    if request.structured_outputs is not None:
        found.append(_structured_outputs(request.structured_outputs))
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(request, f"guided_{kind}")
        if value is not None:
            found.append(_build(f"guided_{kind}", **{kind: value}))
    if len(found) > 1:
        names = " and ".join(c.field for c in found)
        raise ValidationError(f"a request takes one structured-output constraint; given {names}", found[1].field)
    return found[0] if found else None


def _response_format(value: Any) -> Constraint | None:
    field = "response_format"
    if not isinstance(value, dict):
        raise ValidationError("response_format must be an object with a `type`", field)
    kind = value.get("type")
    if "value" in value:   # TGI's chat shape: {"type": ..., "value": ...}
        return _tgi_grammar(value, field)
    extra = set(value) - {"type", "json_schema"}
    if extra:
        raise ValidationError(f"response_format has unknown field(s) {sorted(extra)}", field)
    if kind == "text":
        return None
    if kind == "json_object":
        return _build(field, json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema")
        field = "response_format.json_schema"
        if not isinstance(spec, dict):
            raise ValidationError("response_format.json_schema is required with type json_schema and must be "
                                  "an object {name, schema, strict, description}", field)
        unknown = set(spec) - set(_JSON_SCHEMA_KEYS)
        if unknown:
            raise ValidationError(f"response_format.json_schema has unknown field(s) {sorted(unknown)}", field)
        if not isinstance(spec.get("name", ""), str):
            raise ValidationError("response_format.json_schema.name must be a string", f"{field}.name")
        if spec.get("strict") not in (None, True, False):
            raise ValidationError("response_format.json_schema.strict must be a boolean", f"{field}.strict")
        schema = spec.get("schema")
        if schema is None:   # no schema: any JSON object (as vLLM)
            return _build(f"{field}.schema", json_object=True)
        return _build(f"{field}.schema", json=schema)
    raise ValidationError(f"response_format.type must be \"text\", \"json_object\" or \"json_schema\", got "
                          f"{kind!r}", "response_format.type")


def _structured_outputs(value: Any) -> Constraint:
    field = "structured_outputs"
    if not isinstance(value, dict):
        raise ValidationError("structured_outputs must be an object with one of json, regex, choice, grammar, "
                              "json_object", field)
    kinds: dict[str, Any] = {}
    for key, item in value.items():
        if key in KINDS:
            if item is not None and item is not False:
                kinds[key] = item
        elif key in _NEUTRAL_OPTIONS:
            if item not in _NEUTRAL_OPTIONS[key]:
                raise ValidationError(f"structured_outputs.{key} is not supported by this server",
                                      f"{field}.{key}")
        else:
            raise ValidationError(f"structured_outputs has unknown field {key!r}", f"{field}.{key}")
    if len(kinds) != 1:
        raise ValidationError("structured_outputs takes exactly one of json, regex, choice, grammar or "
                              f"json_object; given {', '.join(kinds) or 'none'}", field)
    [(kind, item)] = kinds.items()
    return _build(f"{field}.{kind}", **{kind: item})


# --- TGI ------------------------------------------------------------------------------------

def from_tgi_grammar(grammar: Any) -> Constraint | None:
    """TGI's `parameters.grammar`, or None."""
    if grammar is None:
        return None
    return _tgi_grammar(grammar, "parameters.grammar")


def _tgi_grammar(value: Any, field: str) -> Constraint:
    """TGI's GrammarType: {"type": "json" (alias "json_object"), "value": schema object or its
    text} | {"type": "regex", "value": str} | {"type": "json_schema", "value": {"name", "schema"}}."""
    if not isinstance(value, dict) or set(value) - {"type", "value"} or "value" not in value:
        raise ValidationError(f"{field} must be {{\"type\": \"json\" | \"regex\" | \"json_schema\", "
                              "\"value\": ...}", field)
    kind, item = value.get("type"), value["value"]
    if kind in ("json", "json_object"):
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except ValueError as exc:
                raise ValidationError(f"{field}: the JSON schema is not valid JSON: {exc}", field) from None
        if not isinstance(item, dict):
            raise ValidationError(f"{field}: Grammar must be a valid JSON object or string", field)
        return _build(field, json=item)
    if kind == "json_schema":
        if not isinstance(item, dict) or not isinstance(item.get("schema"), dict) \
                or set(item) - {"name", "schema"}:
            raise ValidationError(f"{field}: a json_schema value is {{\"name\": str, \"schema\": object}}", field)
        return _build(field, json=item["schema"])
    if kind == "regex":
        if not isinstance(item, str):
            raise ValidationError(f"{field}: a regex value must be a string", field)
        return _build(field, regex=item)
    raise ValidationError(f"{field}.type must be \"json\", \"json_object\", \"regex\" or \"json_schema\", "
                          f"got {kind!r}", field)
