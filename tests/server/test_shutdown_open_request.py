"""Requests still open when the graceful shutdown runs out (SIGTERM, then --shutdown-timeout):
uvicorn cancels their tasks, and they are answered in the route family's error shape
(middleware.AnswerShutdownCancellation), never uvicorn's text/plain 500 or a stream cut off
mid-body, and without a traceback in the log. Through a real server process, plus the
middleware's edges in process."""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from typing import Any

import pytest
import requests

from pagedserve.server.middleware import AnswerShutdownCancellation, final_error_event
from pagedserve.server.errors import ServerShuttingDownError
from tests.server.conftest import scrape_metrics, start_server

LABEL = (("model_name", "SmolLM2-135M-Instruct"),)
MESSAGE = "the server is shutting down: the request was cancelled before it finished"
# 900 tokens take tens of seconds on a CPU: every request is still open 1 s after SIGTERM
LONG = {"max_tokens": 900, "ignore_eos": True, "temperature": 0}
TGI_LONG = {"inputs": "1, 2, 3,", "parameters": {"max_new_tokens": 900}}


def _non_streaming(url: str, body: dict, results: dict, name: str) -> None:
    try:
        response = requests.post(url, json=body, timeout=60)
        results[name] = (response.status_code, response.headers.get("content-type"), response.text)
    except requests.RequestException as exc:
        results[name] = ("failed", repr(exc))


def _streaming(url: str, body: dict, results: dict, name: str, opened: threading.Event) -> None:
    lines: list[str] = []
    try:
        with requests.post(url, json=body, stream=True, timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line.decode())
                    opened.set()
        results[name] = ("ended", lines)
    except requests.RequestException as exc:   # ChunkedEncodingError: the stream was cut off
        results[name] = ("failed", repr(exc), lines[-3:])
    finally:
        opened.set()


def test_open_requests_get_503_or_a_final_error_event_at_shutdown(tmp_path) -> None:
    server = start_server(tmp_path, "shutdown_open", "--no-engine-process", "--dtype", "float32",
                          "--max-model-len", "1024", "--num-kv-blocks", "256", "--shutdown-timeout", "1")
    try:
        server.wait_healthy()
        url = server.base_url
        results: dict[str, Any] = {}
        streams = {name: threading.Event() for name in ("chat_stream", "tgi_stream")}
        threads = [
            threading.Thread(target=_non_streaming, args=(f"{url}/v1/completions", {"prompt": "1, 2, 3,", **LONG},
                                                          results, "completion")),
            threading.Thread(target=_non_streaming, args=(f"{url}/generate", TGI_LONG, results, "tgi")),
            threading.Thread(target=_streaming, args=(
                f"{url}/v1/chat/completions", {"messages": [{"role": "user", "content": "Count to 1000."}],
                                               "stream": True, **LONG}, results, "chat_stream",
                streams["chat_stream"])),
            threading.Thread(target=_streaming, args=(f"{url}/generate_stream", TGI_LONG, results, "tgi_stream",
                                                      streams["tgi_stream"])),
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        for opened in streams.values():   # every stream has sent its first event
            assert opened.wait(max(0.0, deadline - time.monotonic())), results
        while scrape_metrics(url)[("pagedserve:num_requests_running", LABEL)] < 4:   # and both others run
            assert time.monotonic() < deadline and not results, results
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=20)
        assert server.process.wait(timeout=20) == -signal.SIGTERM
    finally:
        server.stop()

    for name, body_of in [("completion", lambda body: body["error"]), ("tgi", lambda body: body)]:
        status, content_type, text = results[name]
        assert (status, content_type) == (503, "application/json"), (name, results[name])
        body = json.loads(text)
        if name == "tgi":
            assert body == {"error": MESSAGE, "error_type": "overloaded"}
        else:
            assert body == {"error": {"message": MESSAGE, "type": "ServiceUnavailableError", "param": None,
                                      "code": 503}}

    outcome, chat = results["chat_stream"]
    assert outcome == "ended", results["chat_stream"]
    assert chat[-1] == "data: [DONE]" and json.loads(chat[-2][len("data: "):]) == {
        "error": {"message": MESSAGE, "type": "ServiceUnavailableError", "param": None, "code": 503}}, chat[-3:]
    assert all("error" not in line for line in chat[:-2])

    outcome, tgi = results["tgi_stream"]
    assert outcome == "ended", results["tgi_stream"]
    assert json.loads(tgi[-1][len("data:"):]) == {"error": MESSAGE, "error_type": "overloaded"}, tgi[-2:]
    assert all(line.startswith('data:{"index":') for line in tgi[:-1])

    log = server.log_tail(200_000)
    for bad in ("Traceback", "CancelledError", "Exception in ASGI application", "500 Internal Server Error"):
        assert bad not in log, log[-6000:]
    cancelled = [line for line in log.splitlines() if "timeout graceful shutdown exceeded" in line]
    assert cancelled and all(line.startswith("INFO") for line in cancelled), cancelled   # answered: not an error


# ---- the middleware in process --------------------------------------------------------------

def _run(app: Any, path: str = "/v1/completions",
         cancel_after: float = 0.05) -> tuple[list[dict], BaseException | None]:
    """`app` behind the middleware as uvicorn runs it (its task cancelled after `cancel_after` s,
    as the graceful shutdown's end does): the messages sent, and what the task ended with."""
    sent: list[dict] = []

    async def receive() -> dict:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    async def main() -> BaseException | None:
        task = asyncio.ensure_future(AnswerShutdownCancellation(app)(
            {"type": "http", "path": path, "method": "POST", "headers": []}, receive, send))
        await asyncio.wait({task}, timeout=cancel_after)
        task.cancel()
        try:
            await task
        except BaseException as exc:   # noqa: BLE001 - what the task ended with is the result
            return exc
        return None

    return sent, asyncio.run(main())


def _start(content_type: bytes = b"text/event-stream; charset=utf-8") -> dict:
    return {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]}


def test_a_request_not_yet_answered_gets_503_and_the_cancellation_ends_there() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(3600)

    sent, ended = _run(app, "/generate")
    assert ended is None   # swallowed, as uvicorn's own handler does: nothing awaits the task
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 503 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"]) == {"error": MESSAGE, "error_type": "overloaded"}


def test_a_stream_ends_with_its_error_event_and_a_finished_response_is_left_alone() -> None:
    async def streaming(scope: Any, receive: Any, send: Any) -> None:
        await send(_start())
        await send({"type": "http.response.body", "body": b'data: {"choices":[]}\n\n', "more_body": True})
        await asyncio.sleep(3600)

    sent, ended = _run(streaming)
    assert ended is None and sent[-1]["more_body"] is False
    assert sent[-1]["body"].decode().endswith("\n\ndata: [DONE]\n\n")

    async def finished(scope: Any, receive: Any, send: Any) -> None:
        await send(_start(b"application/json"))
        await send({"type": "http.response.body", "body": b"{}"})
        await asyncio.sleep(3600)   # e.g. a background task after the response

    sent, ended = _run(finished)
    assert ended is None and len(sent) == 2


def test_a_stray_cancelled_error_is_not_taken_for_the_shutdown() -> None:
    """A CancelledError raised without this task being cancelled (an awaited future's) passes
    through as before: it is a bug to see, not a shutdown to answer."""
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise asyncio.CancelledError

    sent, ended = _run(app, cancel_after=10)
    if not hasattr(asyncio.Task, "cancelling"):   # Python 3.10: no way to tell
        pytest.skip("Task.cancelling() needs Python 3.11")
    assert isinstance(ended, asyncio.CancelledError) and sent == []


@pytest.mark.parametrize("path, last_chunk, expected", [
    ("/dashboard/stream", b"data: {}\n\n", ""),
    ("/v1/completions", b"", f'data: {{"error":{{"message":"{MESSAGE}","type":"ServiceUnavailableError",'
                             f'"param":null,"code":503}}}}\n\ndata: [DONE]\n\n'),
    ("/invocations", b'data:{"index":1}\n\n', f'data:{{"error":"{MESSAGE}","error_type":"overloaded"}}\n\n'),
    ("/generate_stream", b"", f'data:{{"error":"{MESSAGE}","error_type":"overloaded"}}\n\n'),
    ("/v1/responses", b"", f'event: error\ndata: {{"type":"error","sequence_number":0,'
                           f'"message":"{MESSAGE}","param":null,"code":503}}\n\n'),
    # the Responses API's next event (its error events as the route's: `type` the event's, "error")
    ("/invocations", b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                     b'"sequence_number":36,"item_id":"msg_1","delta":" 2"}\n\n',
     f'event: error\ndata: {{"type":"error","sequence_number":37,'
     f'"message":"{MESSAGE}","param":null,"code":503}}\n\n'),
])
def test_final_error_event_frames_as_the_stream_did(path, last_chunk, expected) -> None:
    assert final_error_event(path, last_chunk, ServerShuttingDownError()).decode() == expected
