"""`pagedserve run-batch -i requests.jsonl -o results.jsonl` (vLLM's `run-batch`): OpenAI's batch file
format, run offline through the same routes the server answers (their checks, their bodies).

Each input line is {"custom_id", "method": "POST", "url": "/v1/chat/completions" (or any POST route
of the app: /v1/completions, /v1/embeddings, /v1/score, /v1/rerank, ...), "body"}. Each output line,
in the input's order, is {"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error": null}; a line that is not a request (not UTF-8, bad JSON, no string custom_id, another
method, a stream asked for: `stream` true or a streaming route such as /generate_stream) gets
"response": null and "error": {"code", "message"}, the message naming the line, and the rest of
the batch runs. Lines are split on "\n" only (a JSON string may hold U+2028); a UTF-8 byte order
mark before a line is ignored (RFC 8259 8.1 lets a parser ignore one). A file that cannot be
read at all, or an output file that cannot be written, is one error line and exit status 2.
The requests run concurrently (up to max_num_seqs at a time), so the engine batches them; the
app is called in process, no socket."""
from __future__ import annotations

import argparse
import asyncio
import codecs
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
STREAMING_URLS = frozenset({"/generate_stream"})   # routes that always answer with a stream


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
    output = _open_output(args.output_file)   # before the run: an unwritable path fails at once
    try:
        engine_args = EngineArgs(**engine_kwargs(args))
        settings = ServerSettings(served_model_name=args.served_model_name or served_name_of(engine_args.model),
                                  model_root=engine_args.model, chat_template=load_chat_template(args.chat_template),
                                  max_waiting_requests=max(len(lines), 1))
        results = asyncio.run(_run(engine_args, settings, lines))
        output.write("".join(json.dumps(result) + "\n" for result in results))
    finally:
        if output is not sys.stdout:
            output.close()
    failed = sum(1 for r in results if r["error"] or r["response"]["status_code"] >= 400)
    logger.info("run-batch: %d requests, %d failed; results in %s", len(results), failed, args.output_file)


def _read_lines(path: str) -> list[tuple[int, bytes]]:
    """The file's non-blank lines as (line number, raw bytes): each line is decoded on its
    own, so one line that is not UTF-8 is that line's error, not the file's."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(os.path.expanduser(path), "rb") as f:
                data = f.read()
    except OSError as exc:
        raise ValidationError(f"cannot read the input file: {exc}", "input_file") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ValidationError("the input file is UTF-16 (it starts with a UTF-16 byte order mark); "
                              "run-batch reads UTF-8 JSON lines", "input_file")
    return [(number, line) for number, line in enumerate(data.split(b"\n"), 1) if line.strip()]


def _open_output(path: str) -> Any:
    if path == "-":
        return sys.stdout
    try:
        return open(os.path.expanduser(path), "w", encoding="utf-8")
    except OSError as exc:
        raise ValidationError(f"cannot write the output file: {exc}", "output_file") from None


async def _run(engine_args: Any, settings: ServerSettings,
               lines: list[tuple[int, bytes]]) -> list[dict[str, Any]]:
    from pagedserve.frontend.async_engine import AsyncEngine
    from pagedserve.frontend.async_embedding_engine import AsyncEmbeddingEngine
    from pagedserve.frontend.embedding_engine import use_pooling
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

    async def one(number: int, line: bytes) -> dict[str, Any]:
        async with gate:
            return await _request(app, number, line)

    try:
        return list(await asyncio.gather(*(one(number, line) for number, line in lines)))
    finally:
        await asyncio.to_thread(engine.shutdown)


async def _request(app: Any, number: int, line: bytes) -> dict[str, Any]:
    result: dict[str, Any] = {"id": f"batch-{uuid.uuid4().hex}", "custom_id": None, "response": None, "error": None}
    try:
        url, body = _parse_line(line, result)
        status, payload = await _post(app, url, body)
    except ValueError as exc:
        result["error"] = {"code": "invalid_request", "message": f"line {number}: {exc}"}
        return result
    result["response"] = {"status_code": status, "request_id": f"batch-request-{uuid.uuid4().hex}", "body": payload}
    return result


def _parse_line(line: bytes, result: dict[str, Any]) -> tuple[str, bytes]:
    """One line -> (url, the body's bytes), setting result's custom_id once it is known to be a
    string; ValueError saying what is wrong with the line."""
    try:
        text = line.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise ValueError(f"the line is not valid UTF-8 (byte {exc.start + 1})") from None
    try:
        request = json.loads(text)
    except RecursionError:
        raise ValueError("the line nests too deeply to be read as JSON") from None
    except ValueError as exc:   # json.JSONDecodeError is one
        raise ValueError(f"the line is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ValueError("a line must be a JSON object {\"custom_id\", \"method\", \"url\", \"body\"}")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str):
        raise ValueError("custom_id is required" if custom_id is None
                         else f"custom_id must be a string, got {type(custom_id).__name__}")
    result["custom_id"] = custom_id
    method, url, body = request.get("method", "POST"), request.get("url"), request.get("body")
    if method != "POST" or not isinstance(url, str) or not url.startswith("/") or not url.isascii():
        raise ValueError(f"expected method POST and a url such as /v1/chat/completions, got {method} {url!r}")
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    if url in STREAMING_URLS:
        raise ValueError(f"url {url} streams its answer, which a batch cannot hold (use /generate)")
    if body.get("stream"):
        raise ValueError("stream is not supported in a batch")
    try:
        return url, json.dumps(body).encode()
    except (RecursionError, ValueError):
        raise ValueError("body nests too deeply") from None


async def _post(app: Any, path: str, body: bytes) -> tuple[int, Any]:
    """One POST through the ASGI app in process: (status, the JSON body). A route that raises
    is a 500 with an error body (one line never ends the batch); an answer that streams
    (text/event-stream) is a ValueError, the line's error."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    sent, status, chunks, streamed = False, 500, [], False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()   # no disconnect: the request runs to its end
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, streamed
        if message["type"] == "http.response.start":
            status = message["status"]
            streamed = any(name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                           for name, value in message.get("headers", ()))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    except Exception as exc:   # the app answered 500 already, or could not
        logger.exception("run-batch: %s failed", path)
        return 500, {"error": {"message": f"the request failed: {type(exc).__name__}: {exc}",
                               "type": "InternalServerError", "param": None, "code": 500}}
    if streamed:
        raise ValueError(f"url {path} answered with a stream, which a batch cannot hold")
    raw = b"".join(chunks)
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", "replace")

