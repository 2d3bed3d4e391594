"""`pagedserve run-batch -i requests.jsonl -o results.jsonl` (vLLM's `run-batch`): OpenAI's batch file
format, run offline through the same routes the server answers (their checks, their bodies).

Each input line is {"custom_id", "method": "POST", "url": "/v1/chat/completions" (or any POST route
of the app: /v1/completions, /v1/embeddings, /v1/score, /v1/rerank, ...), "body"}. Each output line,
in the input's order, is {"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error": null}; a line that is not a request (bad JSON, another method, a stream asked for) gets
"response": null and "error": {"code", "message"}. The requests run concurrently (up to
max_num_seqs at a time), so the engine batches them; the app is called in process, no socket."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid
from typing import Any

from pagedserve.errors import ValidationError
from pagedserve.server.context import ServerSettings
from pagedserve.server.engine_flags import add_engine_arguments, engine_kwargs

logger = logging.getLogger(__name__)


def add_run_batch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("-i", "--input-file", required=True, help="the requests, one JSON object a line ('-': stdin)")
    parser.add_argument("-o", "--output-file", required=True, help="where the results go, one a line ('-': stdout)")
    parser.add_argument("--served-model-name", default=None, help="the model name the bodies may give")
    parser.add_argument("--chat-template", default=None, help="a Jinja template, or a file holding one")
    add_engine_arguments(parser.add_argument_group("engine"))
    return parser


def run_batch(args: argparse.Namespace) -> None:
    from pagedserve.engine_args import EngineArgs
    from pagedserve.server.serve import load_chat_template, served_name_of
    lines = _read_lines(args.input_file)
    engine_args = EngineArgs(**engine_kwargs(args))
    settings = ServerSettings(served_model_name=args.served_model_name or served_name_of(engine_args.model),
                              model_root=engine_args.model, chat_template=load_chat_template(args.chat_template),
                              max_waiting_requests=max(len(lines), 1))
    results = asyncio.run(_run(engine_args, settings, lines))
    text = "".join(json.dumps(result) + "\n" for result in results)
    if args.output_file == "-":
        sys.stdout.write(text)
    else:
        with open(args.output_file, "w", encoding="utf-8") as f:
            f.write(text)
    failed = sum(1 for r in results if r["error"] or r["response"]["status_code"] >= 400)
    logger.info("run-batch: %d requests, %d failed; results in %s", len(results), failed, args.output_file)


def _read_lines(path: str) -> list[str]:
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        raise ValidationError(f"cannot read the input file: {exc}", "input_file") from None
    return [line for line in text.splitlines() if line.strip()]


async def _run(engine_args: Any, settings: ServerSettings, lines: list[str]) -> list[dict[str, Any]]:
    from pagedserve.frontend.async_engine import AsyncEngine
    from pagedserve.frontend.embedding_engine import AsyncEmbeddingEngine, use_pooling
    from pagedserve.server.app import build_app
    from pagedserve.server.embeddings import build_embedding_app
    if use_pooling(engine_args):
        engine: Any = AsyncEmbeddingEngine.from_engine_args(engine_args)
        app = build_embedding_app(engine, settings)
        limit = engine.engine.max_num_seqs
    else:
        engine = AsyncEngine.from_engine_args(engine_args)
        app = build_app(engine, settings)
        limit = engine.max_num_seqs
    gate = asyncio.Semaphore(limit)

    async def one(line: str) -> dict[str, Any]:
        async with gate:
            return await _request(app, line)

    try:
        return list(await asyncio.gather(*(one(line) for line in lines)))
    finally:
        await asyncio.to_thread(engine.shutdown)


async def _request(app: Any, line: str) -> dict[str, Any]:
    result: dict[str, Any] = {"id": f"batch-{uuid.uuid4().hex}", "custom_id": None, "response": None, "error": None}
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ValueError("a line must be a JSON object")
        result["custom_id"] = request.get("custom_id")
        method, url, body = request.get("method", "POST"), request.get("url"), request.get("body")
        if method != "POST" or not isinstance(url, str) or not url.startswith("/"):
            raise ValueError(f"expected method POST and a url such as /v1/chat/completions, got {method} {url!r}")
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        if body.get("stream"):
            raise ValueError("stream is not supported in a batch")
    except ValueError as exc:   # json.JSONDecodeError is one
        result["error"] = {"code": "invalid_request", "message": str(exc)}
        return result
    status, payload = await _post(app, url, json.dumps(body).encode())
    result["response"] = {"status_code": status, "request_id": f"batch-request-{uuid.uuid4().hex}", "body": payload}
    return result


async def _post(app: Any, path: str, body: bytes) -> tuple[int, Any]:
    """One POST through the ASGI app in process: (status, the JSON body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    sent, status, chunks = False, 500, []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()   # no disconnect: the request runs to its end
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    raw = b"".join(chunks)
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", "replace")
