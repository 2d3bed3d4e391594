"""HTTP errors: one table from error class to how each API family answers it.

    OpenAI routes (/v1/*, /tokenize, /detokenize, unknown routes):
        {"error": {"message": str, "type": str, "param": str | null, "code": int}}
        (`type` and `code` as vLLM's server sets them: the error class name and the status)
    TGI routes (/generate, /generate_stream, /, /info, and /tokenize with TGI's body):
        {"error": str, "error_type": str}   (422 validation, 429 overloaded, 424 generation)

The route family decides which body; the error's class decides the status and the type.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from pagedserve.errors import (EngineDeadError, OverloadedError, RequestAbortedError, RequestFailedError,
                               ValidationError)

logger = logging.getLogger(__name__)


RETRY_AFTER_S = 1   # what an overloaded server asks clients to wait before retrying


class API(enum.Enum):
    """The route family: it picks the error body and the SSE framing."""

    OPENAI = "openai"
    TGI = "tgi"


TGI_PATHS = frozenset({"/generate", "/generate_stream", "/", "/info", "/embed", "/predict"})   # /embed, /predict: TEI's


def api_of(path: str) -> API:
    """The family of a route by its path (/tokenize is vLLM's unless its body is TGI's)."""
    return API.TGI if path in TGI_PATHS else API.OPENAI


class HTTPError(Exception):
    """An error the server answers itself; ERRORS fixes its status per subclass
    (`status` overrides it, e.g. for a status Starlette raised)."""

    def __init__(self, message: str, param: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.headers = headers


class BadRequestError(HTTPError):
    pass


class UnauthorizedError(HTTPError):
    pass


class NotFoundError(HTTPError):
    pass


class MethodNotAllowedError(HTTPError):
    pass


class RequestTooLargeError(HTTPError):
    pass


class ClientDisconnected(HTTPError):
    """The client went away before the response was ready (nginx's 499; nobody reads it)."""

    def __init__(self, message: str = "the client closed the connection", param: str | None = None) -> None:
        super().__init__(message, param)


class RequestTimeoutError(HTTPError):
    """The request's body stalled mid-way (connections.RequestDeadline)."""


class ServiceUnavailableError(HTTPError):
    pass


class ServerShuttingDownError(ServiceUnavailableError):
    """The server stopped (SIGTERM / Ctrl-C) before the request finished: it was still open when
    --shutdown-timeout ran out (middleware.AnswerShutdownCancellation). Retrying elsewhere may help."""

    def __init__(self, message: str = "the server is shutting down: the request was cancelled before it finished",
                 param: str | None = None) -> None:
        super().__init__(message, param)


class IncompleteGenerationError(HTTPError):
    """A request ended without the output it owed (its last token, or any output)."""


class _Row(NamedTuple):
    openai_status: int
    openai_type: str
    tgi_status: int
    tgi_type: str
    default_message: str


# error class -> its answer in each family; the most specific class in an error's MRO wins.
ERRORS: dict[type[BaseException], _Row] = {
    ValidationError: _Row(400, "BadRequestError", 422, "validation", "invalid request"),
    OverloadedError: _Row(503, "ServiceUnavailableError", 429, "overloaded", "Model is overloaded"),
    EngineDeadError: _Row(503, "EngineDeadError", 424, "generation", "the engine is dead"),
    RequestFailedError: _Row(500, "InternalServerError", 424, "generation", "the engine failed the request"),
    RequestAbortedError: _Row(500, "RequestAbortedError", 500, "incomplete_generation", "the request was aborted"),
    HTTPError: _Row(500, "InternalServerError", 500, "generation", "internal server error"),
    BadRequestError: _Row(400, "BadRequestError", 422, "validation", "bad request"),
    UnauthorizedError: _Row(401, "AuthenticationError", 401, "authentication", "unauthorized"),
    NotFoundError: _Row(404, "NotFoundError", 404, "validation", "not found"),
    MethodNotAllowedError: _Row(405, "MethodNotAllowedError", 405, "validation", "method not allowed"),
    RequestTooLargeError: _Row(413, "RequestTooLargeError", 413, "validation", "request too large"),
    # TGI's type for a request its client dropped: its router counts tgi_request_failure{err="dropped"}
    ClientDisconnected: _Row(499, "ClientClosedRequest", 499, "dropped", "the client closed the connection"),
    RequestTimeoutError: _Row(408, "RequestTimeoutError", 408, "validation", "the request did not arrive in time"),
    ServiceUnavailableError: _Row(503, "ServiceUnavailableError", 503, "validation", "service unavailable"),
    # TGI's clients know "overloaded" as the retryable kind (text_generation's OverloadedError)
    ServerShuttingDownError: _Row(503, "ServiceUnavailableError", 503, "overloaded", "the server is shutting down"),
    IncompleteGenerationError: _Row(500, "InternalServerError", 500, "incomplete_generation",
                                    "the request ended without its output"),
}
ERRORS[ClientDisconnect] = ERRORS[ClientDisconnected]   # Starlette's: the client left while its body uploaded


@dataclass(frozen=True)
class ErrorInfo:
    """One error as one family answers it."""

    api: API
    status: int
    type: str
    message: str
    param: str | None = None
    headers: dict[str, str] | None = None   # e.g. Retry-After on 429/503, Allow on 405

    def body(self) -> dict[str, Any]:
        if self.api is API.TGI:
            return {"error": self.message, "error_type": self.type}
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def describe(exc: BaseException, api: API = API.OPENAI) -> ErrorInfo:
    """Any exception a route can raise, as `api` answers it."""
    row = next((ERRORS[cls] for cls in type(exc).__mro__ if cls in ERRORS), None)
    if row is None:
        logger.exception("unexpected error while serving a request", exc_info=exc)
        status, error_type = (500, "InternalServerError") if api is API.OPENAI else (500, "generation")
        return ErrorInfo(api, status, error_type, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, (ClientDisconnected, ClientDisconnect)):   # nobody reads the answer: no error to log
        logger.debug("the client closed the connection before its response (%s)", type(exc).__name__)
    status, error_type = (row.openai_status, row.openai_type) if api is API.OPENAI else (row.tgi_status, row.tgi_type)
    if isinstance(exc, HTTPError) and exc.status is not None:
        status = exc.status
    message = getattr(exc, "message", None) or str(exc) or row.default_message
    message, param = _encodable(message), _encodable(getattr(exc, "param", None))
    headers = getattr(exc, "headers", None) if isinstance(exc, HTTPError) else None
    if isinstance(exc, OverloadedError):
        headers = {"Retry-After": str(RETRY_AFTER_S)}   # clients (openai-python, TGI's) back off and retry
    return ErrorInfo(api, int(status), error_type, message, param, headers)


def _encodable(text: str | None) -> str | None:
    """`text` with anything UTF-8 cannot hold (a lone surrogate echoed from a request)
    replaced, so the error body itself can always be sent."""
    if text is None:
        return None
    return text.encode("utf-8", "replace").decode("utf-8")


def error_response(exc: BaseException, api: API = API.OPENAI) -> JSONResponse:
    return describe(exc, api).response()


def error_payload(exc: BaseException, api: API = API.OPENAI) -> dict[str, Any]:
    """The body of `exc` for an SSE `data:` event (a stream that already answered 200)."""
    return describe(exc, api).body()


def response_error_fields(exc: BaseException) -> dict[str, Any]:
    """The fields of the Responses API's `error` event for `exc` (its message, code, param): the
    OpenAI error body's but `type`, which is the event's own ("error")."""
    return {key: value for key, value in describe(exc).body()["error"].items() if key != "type"}


# The bodies above as schemas, for /openapi.json (openapi_docs.py).
class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


class TGIErrorBody(BaseModel):
    error: str
    error_type: str


# status -> when a route family answers it (what /openapi.json lists per route)
ERROR_STATUSES: dict[API, dict[int, str]] = {
    API.OPENAI: {400: "invalid request: `param` names the field", 401: "missing or wrong API key",
                 404: "unknown model or route", 405: "method not allowed (see the Allow header)",
                 413: "request body too large",
                 503: "overloaded (see Retry-After), the engine is dead, or the server shut down before the "
                      "request finished"},
    API.TGI: {401: "missing or wrong API key", 413: "request body too large",
              422: "invalid request: the message names the field", 424: "the generation failed",
              429: "overloaded (see Retry-After)", 503: "the server shut down before the request finished"},
}


async def http_exception(request: Any, exc: Any) -> JSONResponse:
    """Starlette's HTTPException (no route, wrong method, ...) in the API's error body."""
    if exc.status_code == 404:
        error: HTTPError = NotFoundError(f"no route for {request.method} {request.url.path}")
    elif exc.status_code == 405:   # Starlette's exception carries the Allow header
        error = MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}",
                                      headers=exc.headers)
    else:
        error = HTTPError(str(exc.detail), status=exc.status_code, headers=exc.headers)
    return error_response(error, api_of(request.url.path))


async def request_validation_error(request: Any, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's check of a route's declared parameters (/debug/steps?raw=abc) in the API's
    error body, naming the parameter."""
    error = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = tuple(error.get("loc", ()))
    param = ".".join(str(part) for part in loc[1:] if part != "") or None   # loc[0]: "query", "path", ...
    message = f"{param}: {error.get('msg')}" if param else str(error.get("msg"))
    return error_response(ValidationError(message, param), api_of(request.url.path))
