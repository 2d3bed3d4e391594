"""Pure-ASGI middleware (no buffering of streamed responses): the API-key check, a request
body size limit, and the answer of a request the server's shutdown cancelled. All answer in
the route family's error body (errors.py)."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from urllib.parse import unquote_to_bytes

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedserve.server.errors import (API, HTTPError, RequestTooLargeError, ServerShuttingDownError, UnauthorizedError,
                                      api_of, describe, response_error_fields)
from pagedserve.server.streaming import DONE_EVENT, sse_event

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


_SEQUENCE_NUMBER = re.compile(rb'"sequence_number":(\d+)')


class AnswerShutdownCancellation:
    """A request still open when the server's graceful shutdown (--shutdown-timeout after
    SIGTERM / Ctrl-C) runs out is cancelled by uvicorn: its task gets CancelledError, which
    uvicorn would answer with a text/plain 500 (or a stream cut off mid-body) and a traceback.
    Here it is answered instead, once the route's own cleanup ran (its engine requests aborted):

    - no response started yet: 503 in the route family's error body (ServerShuttingDownError);
    - a Server-Sent Events stream under way: a last error event in the stream's own framing
      (OpenAI's `data: {"error": ...}` then `data: [DONE]`, TGI's `data:{"error": ..., "error_type": ...}`,
      the Responses API's `event: error` with the next sequence number), then the stream's end;
      the dashboard's stream just ends;
    - a response already sent whole: nothing; any other response cut off mid-body: the
      connection is closed (uvicorn's one-line "without completing response" log).

    The cancellation ends there (uvicorn's own handler swallows it too: nothing awaits the
    request's task). A CancelledError that is not this task's own cancellation passes through,
    as before. Wraps the whole app (serve.py), so both servers and every route have it; the
    family is the request's path's (/invocations and a TEI body on /rerank: OpenAI's), except
    that a stream's framing is read from what it sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = _Sent()

        async def watched_send(message: Message) -> None:
            state.saw(message)
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            cancelling = getattr(task, "cancelling", None)   # Python >= 3.11
            if task is None or (cancelling is not None and cancelling() == 0):
                raise   # not a cancellation of this request's task
            if cancelling is not None:
                task.uncancel()   # type: ignore[union-attr]
            await self._answer(scope, send, state)

    @staticmethod
    async def _answer(scope: Scope, send: Send, state: "_Sent") -> None:
        path = scope["path"]
        error = ServerShuttingDownError()
        try:
            if not state.started:
                logger.info("%s %s was still open when the server shut down: answered 503", scope.get("method"), path)
                await send_error(send, path, error, [(b"connection", b"close")])
            elif state.complete:
                logger.debug("%s %s was cancelled at shutdown after its response", scope.get("method"), path)
            elif state.event_stream:
                logger.info("%s %s was still streaming when the server shut down: its stream was ended",
                            scope.get("method"), path)
                await send({"type": "http.response.body", "body": final_error_event(path, state.last_chunk, error),
                            "more_body": False})
            else:   # returning leaves the response unfinished: uvicorn closes the connection
                logger.info("%s %s was cut off mid-response when the server shut down", scope.get("method"), path)
        except (Exception, asyncio.CancelledError) as exc:   # the connection broke, or the loop is closing
            logger.debug("could not answer %s at shutdown: %r", path, exc)


class _Sent:
    """What a request has sent so far: whether its response started, whether it is an event
    stream, whether it is complete, and its last body chunk."""

    started = False
    complete = False
    event_stream = False
    last_chunk = b""

    def saw(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            headers = message.get("headers", ())
            content_type = next((value for name, value in headers if name.lower() == b"content-type"), b"")
            self.event_stream = content_type.lower().startswith(b"text/event-stream")
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if body:
                self.last_chunk = bytes(body)
            if not message.get("more_body", False):
                self.complete = True


def final_error_event(path: str, last_chunk: bytes, error: BaseException) -> bytes:
    """The event that ends a stream with `error`, framed as the stream's last event was (or,
    before any event, as the path's route frames its events)."""
    if is_dashboard(path):
        return b""
    if last_chunk.startswith(b"event: ") or (not last_chunk and path == "/v1/responses"):
        numbers = _SEQUENCE_NUMBER.findall(last_chunk)
        payload = {"type": "error", "sequence_number": int(numbers[-1]) + 1 if numbers else 0,
                   **response_error_fields(error)}
        return f"event: error\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()
    tgi = last_chunk.startswith(b"data:") and not last_chunk.startswith(b"data: ")
    api = API.TGI if tgi or (not last_chunk and api_of(path) is API.TGI) else API.OPENAI
    event = sse_event(describe(error, api).body(), api)
    return (event if api is API.TGI else event + DONE_EVENT).encode()
