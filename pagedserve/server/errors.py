"""HTTP errors: each error class maps to one status and the OpenAI error body

    {"error": {"message": str, "type": str, "param": str | null, "code": int}}

(`type` and `code` as vLLM's server sets them: the error class name and the status).
"""
from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi.responses import JSONResponse

from pagedserve.errors import EngineDeadError, OverloadedError, RequestAbortedError, ValidationError
from pagedserve.frontend.async_engine import RequestFailedError

logger = logging.getLogger(__name__)


class HTTPError(Exception):
    """An error the server answers itself; subclasses fix the status."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR
    error_type = "InternalServerError"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequestError(HTTPError):
    status = HTTPStatus.BAD_REQUEST
    error_type = "BadRequestError"


class UnauthorizedError(HTTPError):
    status = HTTPStatus.UNAUTHORIZED
    error_type = "AuthenticationError"


class NotFoundError(HTTPError):
    status = HTTPStatus.NOT_FOUND
    error_type = "NotFoundError"


class MethodNotAllowedError(HTTPError):
    status = HTTPStatus.METHOD_NOT_ALLOWED
    error_type = "MethodNotAllowedError"


class RequestTooLargeError(HTTPError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    error_type = "RequestTooLargeError"


class ClientDisconnected(HTTPError):
    """The client went away before the response was ready (nginx's 499; nobody reads it)."""

    status = 499   # type: ignore[assignment]
    error_type = "ClientClosedRequest"

    def __init__(self, message: str = "the client closed the connection", param: str | None = None) -> None:
        super().__init__(message, param)


class ServiceUnavailableError(HTTPError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    error_type = "ServiceUnavailableError"


def error_body(status: HTTPStatus | int, error_type: str, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": int(status)}}


def classify(exc: BaseException) -> tuple[HTTPStatus | int, str, str, str | None]:
    """(status, type, message, param) for any exception a route can raise."""
    if isinstance(exc, HTTPError):
        return exc.status, exc.error_type, exc.message, exc.param
    if isinstance(exc, ValidationError):
        return HTTPStatus.BAD_REQUEST, "BadRequestError", exc.message, exc.param
    if isinstance(exc, EngineDeadError):
        return HTTPStatus.SERVICE_UNAVAILABLE, "EngineDeadError", str(exc) or "the engine is dead", None
    if isinstance(exc, OverloadedError):
        return HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError", str(exc) or "the engine is overloaded", None
    if isinstance(exc, RequestAbortedError):
        return HTTPStatus.INTERNAL_SERVER_ERROR, "RequestAbortedError", str(exc) or "the request was aborted", None
    if isinstance(exc, RequestFailedError):
        return HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError", str(exc), None
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError", f"{type(exc).__name__}: {exc}", None


def error_response(exc: BaseException) -> JSONResponse:
    status, error_type, message, param = classify(exc)
    return JSONResponse(error_body(status, error_type, message, param), status_code=int(status))


def error_payload(exc: BaseException) -> dict:
    """The body of `exc` for an SSE `data:` event (a stream that already answered 200)."""
    status, error_type, message, param = classify(exc)
    return error_body(status, error_type, message, param)
