"""Typed errors. Validation errors name the parameter; HTTP layers map each class to one
status code and their API's error body."""
from __future__ import annotations


class PagedServeError(Exception):
    """Base class of every error pagedserve raises on purpose."""


class ValidationError(PagedServeError, ValueError):
    """Bad user input. `param` names the offending field (e.g. "temperature")."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class OverloadedError(PagedServeError):
    """Too many requests in flight; the caller may retry later."""


class EngineDeadError(PagedServeError):
    """The engine loop died; no request can be served until restart."""


class ModelLoadError(PagedServeError):
    """A model could not be found, read or is of an unsupported kind."""


class RequestFailedError(PagedServeError):
    """The engine failed this one request (the others go on); the message carries the cause."""


class RequestAbortedError(PagedServeError):
    """The request was aborted (client disconnect or explicit abort)."""
