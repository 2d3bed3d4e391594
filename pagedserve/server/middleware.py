"""Pure-ASGI middleware (no buffering of streamed responses): the API-key check and a
request body size limit. Both answer in the route family's error body (errors.py)."""
from __future__ import annotations

import hmac
import json
import logging
from urllib.parse import unquote_to_bytes

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedserve.server.errors import HTTPError, RequestTooLargeError, UnauthorizedError, api_of, describe

logger = logging.getLogger(__name__)

# Routes that touch the model need the key: every /v1 and /v2 route, TGI's generation routes,
# the embedding server's scoring routes (TEI's and vLLM's), and the tokenizer routes; and the
# dashboard (its page, stream and figures) and /debug/* (the engine's step timing, which
# ?reset=1 restarts). /health, /metrics, /version and /info stay open (as vLLM and TGI).
GUARDED_PATHS = frozenset({"/generate", "/generate_stream", "/", "/tokenize", "/detokenize", "/tokenizer_info",
                           "/invocations", "/score", "/rerank", "/classify", "/embed", "/predict"})
DASHBOARD_COOKIE = b"pagedserve_api_key"   # the dashboard page's key form sets it (browsers send no header)


def needs_api_key(path: str) -> bool:
    return path.startswith(("/v1/", "/v2/", "/debug")) or path in GUARDED_PATHS or is_dashboard(path)


def is_dashboard(path: str) -> bool:
    return path == "/dashboard" or path.startswith("/dashboard/")


def _cookie(headers: dict[bytes, bytes], name: bytes) -> bytes:
    for part in headers.get(b"cookie", b"").split(b";"):
        key, _, value = part.strip().partition(b"=")
        if key == name:
            return value
    return b""


LOGIN_PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><title>pagedserve dashboard</title></head>
<body style="font-family:sans-serif;margin:3em"><h1>pagedserve dashboard</h1>
<p>This server needs its API key.</p><form id="f"><input id="k" type="password" placeholder="API key" autofocus>
<button>Open</button></form><script>document.getElementById("f").onsubmit=function(e){e.preventDefault();
document.cookie="pagedserve_api_key="+encodeURIComponent(document.getElementById("k").value)+
";path=/dashboard;SameSite=Strict";location.reload();};</script></body></html>"""


async def send_error(send: Send, path: str, error: HTTPError, headers: list | None = None) -> None:
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
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        path = scope["path"]
        if is_dashboard(path) and not given:
            given = b"Bearer " + unquote_to_bytes(_cookie(headers, DASHBOARD_COOKIE))
        if not hmac.compare_digest(given, self.expected):
            if path == "/dashboard":   # a person with a browser: ask for the key
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"text/html; charset=utf-8"),
                                        (b"content-length", str(len(LOGIN_PAGE)).encode()),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": LOGIN_PAGE})
                return
            await send_error(send, scope["path"], UnauthorizedError(
                "missing or invalid API key: send `Authorization: Bearer <key>`", "api_key"),
                [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """413 for a declared Content-Length over the limit; a chunked body that grows past it
    makes `receive` raise RequestTooLargeError, which the route answers as a 413. A client
    that leaves while its body uploads ends a route that read the body outside its error
    handling here, quietly (no traceback: nobody is there to answer)."""

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
            await send_error(send, scope["path"], too_large)
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

        try:
            await self.app(scope, limited_receive, send)
        except ClientDisconnect:
            logger.debug("the client closed the connection while sending %s", scope["path"])
