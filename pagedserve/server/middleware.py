"""Pure-ASGI middleware (no buffering of streamed responses): the API-key check and a
request body size limit. Both answer in the route family's error body (errors.py)."""
from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedserve.server.errors import HTTPError, RequestTooLargeError, UnauthorizedError, api_of, describe

# Routes that touch the model need the key: every /v1 route, TGI's generation routes, and
# the tokenizer routes. /health, /metrics, /version and /info stay open (as vLLM and TGI).
GUARDED_PATHS = frozenset({"/generate", "/generate_stream", "/", "/tokenize", "/detokenize", "/tokenizer_info"})


def needs_api_key(path: str) -> bool:
    return path.startswith("/v1") or path in GUARDED_PATHS


async def _send_error(send: Send, path: str, error: HTTPError, headers: list | None = None) -> None:
    info = describe(error, api_of(path))
    body = json.dumps(info.body()).encode()
    own = [(name.lower().encode(), value.encode()) for name, value in (info.headers or {}).items()]
    await send({"type": "http.response.start", "status": info.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *own, *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    """Guarded routes need `Authorization: Bearer <api_key>`, compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or not needs_api_key(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            await _send_error(send, scope["path"], UnauthorizedError(
                "missing or invalid API key: send `Authorization: Bearer <key>`", "api_key"),
                [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """413 for a declared Content-Length over the limit; a chunked body that grows past it
    makes `receive` raise RequestTooLargeError, which the route answers as a 413."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = RequestTooLargeError(f"the request body is larger than {self.max_bytes} bytes", None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, scope["path"], too_large)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)
