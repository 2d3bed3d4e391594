"""SageMaker's `POST /invocations`, as vLLM and TGI serve it: one path for every request kind,
dispatched by the body's fields to the route that serves it (auth, size limit, admission and
errors are that route's). A generating server (GENERATE_ROUTES): `messages` -> chat completions,
`prompt` -> completions, `inputs` -> TGI's `/` (`/generate`, or `/generate_stream` when
`stream` is true), `input` -> embeddings (a 400 naming `model` here, as on /v1/embeddings).
An embedding server (EMBEDDING_ROUTES): `input` -> /v1/embeddings, `inputs` -> TEI's /embed,
`text_1` -> /score, `query` -> /rerank. `GET|POST /ping` is /health (app.add_health_routes).

Pure ASGI: the body is read once (through the size limit that wraps this middleware), its
fields looked at, and replayed to the app under the target's path."""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedserve.errors import ValidationError
from pagedserve.server.errors import HTTPError
from pagedserve.server.middleware import send_error
from pagedserve.server.request_body import decode_json_off_loop

INVOCATIONS = "/invocations"
GENERATE_ROUTES = (("messages", "/v1/chat/completions"), ("prompt", "/v1/completions"), ("inputs", "/"),
                   ("input", "/v1/embeddings"))
EMBEDDING_ROUTES = (("input", "/v1/embeddings"), ("inputs", "/embed"), ("text_1", "/score"), ("query", "/rerank"))


def invocation_target(body: object, routes: tuple[tuple[str, str], ...]) -> str:
    """The path a body of /invocations goes to: the route of the first of `routes`' fields it has."""
    if isinstance(body, dict):
        for field, path in routes:
            if field in body:
                return path
    fields = ", ".join(f"{field} ({path})" for field, path in routes)
    raise ValidationError(f"an /invocations body is a JSON object with one of: {fields}", "body")


class InvocationsMiddleware:
    def __init__(self, app: ASGIApp, routes: tuple[tuple[str, str], ...]) -> None:
        self.app, self.routes = app, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != INVOCATIONS or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chunks = []
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            raw = b"".join(chunks)
            try:
                body = await decode_json_off_loop(raw, check=False)   # the route checks its values
            except ValidationError:
                body = None   # not JSON: the error below names the body (the routes' own checks never run)
            target = invocation_target(body, self.routes)
        except (HTTPError, ValidationError) as exc:
            await send_error(send, INVOCATIONS, exc)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()   # after the body: the client's disconnect, as the route expects
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}

        await self.app({**scope, "path": target, "raw_path": target.encode()}, replay, send)
