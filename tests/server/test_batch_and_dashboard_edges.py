"""Audit items on run-batch, the dashboard, chat content parts and TGI's failure metric, each
through a real process: a bad batch line is that line's error record and the rest runs; an
unreadable file is one error line and exit 2; the dashboard's viewer limit holds against
simultaneous viewers and every place comes back; content parts of other types are a 400 naming
the part; a client that leaves /generate is TGI's err="dropped", not a validation failure."""
from __future__ import annotations

import codecs
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from pagedserve.server.dashboard import MAX_VIEWERS
from tests.server.conftest import scrape_metrics, wait_idle

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "128"]
COMPLETION = {"prompt": "The capital of France is", "max_tokens": 2, "temperature": 0}


def _line(custom_id: object, url: str = "/v1/completions", body: dict | None = None) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body or COMPLETION},
                      ensure_ascii=False).encode()


def _run_batch(source: Path, output: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedserve.cli", "run-batch", "-i", str(source), "-o", str(output),
                           *ARGS], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_run_batch_bad_lines_are_their_own_errors(tmp_path: Path) -> None:
    lines = [
        codecs.BOM_UTF8 + _line("bom"),                       # a byte order mark before the file's first line
        b"[" * 200_000,                                         # nests past the JSON reader's recursion
        _line("utf8").replace(b'"POST"', b'"PO\xffST"'),        # not UTF-8
        _line("stream", "/generate_stream", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}),
        _line(5),                                               # custom_id must be a string
        json.dumps({"method": "POST", "url": "/v1/completions", "body": COMPLETION}).encode(),   # no custom_id
        _line("sep", body={**COMPLETION, "prompt": "a\u2028b"}),   # U+2028 inside a string is not a line break
        _line("last"),
    ]
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\r\n".join(lines) + b"\r\n")
    result = _run_batch(source, tmp_path / "out.jsonl")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [o["custom_id"] for o in out] == ["bom", None, None, "stream", None, None, "sep", "last"]
    for record in (out[0], out[6], out[7]):
        assert record["error"] is None and record["response"]["status_code"] == 200, record
        assert record["response"]["body"]["usage"]["completion_tokens"] == 2
    errors = {i: o["error"]["message"] for i, o in enumerate(out) if o["error"]}
    assert sorted(errors) == [1, 2, 3, 4, 5]
    assert all(out[i]["response"] is None and out[i]["error"]["code"] == "invalid_request" for i in errors)
    assert errors[1].startswith("line 2: ") and "nests too deeply" in errors[1]
    assert errors[2].startswith("line 3: ") and "not valid UTF-8" in errors[2]
    assert errors[3].startswith("line 4: ") and "/generate_stream" in errors[3] and "stream" in errors[3]
    assert errors[4] == "line 5: custom_id must be a string, got int"
    assert errors[5] == "line 6: custom_id is required"


def test_run_batch_unreadable_files_are_one_error_line(tmp_path: Path) -> None:
    utf16, good = tmp_path / "utf16.jsonl", tmp_path / "good.jsonl"
    utf16.write_bytes(_line("x").decode().encode("utf-16"))
    good.write_bytes(_line("x") + b"\n")
    out, nowhere = str(tmp_path / "out.jsonl"), str(tmp_path / "no-such-dir" / "out.jsonl")
    for args, param, words in (([str(tmp_path / "missing.jsonl"), out], "input_file", "cannot read the input file"),
                               ([str(utf16), out], "input_file", "UTF-16"),
                               ([str(good), nowhere], "output_file", "cannot write the output file")):
        result = subprocess.run([sys.executable, "-m", "pagedserve.cli", "run-batch", "-i", args[0], "-o", args[1]],
                                capture_output=True, text=True, timeout=120, cwd=ROOT)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert lines[0].startswith("pagedserve run-batch: error: ") and words in lines[0]
        assert lines[0].endswith(f"(parameter: {param})")


def _open_viewers(port: int, count: int) -> list[socket.socket]:
    """`count` GET /dashboard/events sent at once, on connections opened beforehand."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    for sock in socks:
        sock.sendall(b"GET /dashboard/events HTTP/1.1\r\nHost: x\r\n\r\n")
    return socks


def _status(sock: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(64)
        assert chunk, "connection closed before the status line"
        head += chunk
    return int(head.split(b" ", 2)[1])


def test_dashboard_viewer_limit_holds_for_simultaneous_viewers(server) -> None:
    socks = _open_viewers(server.port, MAX_VIEWERS + 4)
    try:
        statuses = [_status(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert sorted(statuses) == [200] * MAX_VIEWERS + [503] * 4, statuses
    # every place comes back once its client is gone (most of these never read a frame)
    deadline = time.monotonic() + 10
    while True:
        socks = _open_viewers(server.port, MAX_VIEWERS)
        try:
            statuses = [_status(sock) for sock in socks]
        finally:
            for sock in socks:
                sock.close()
        if statuses == [200] * MAX_VIEWERS:
            break
        assert time.monotonic() < deadline, f"viewer places were not given back: {statuses}"
        time.sleep(0.2)


@pytest.mark.parametrize("content, param, message", [
    ([{"type": "text", "text": "Describe"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
     "messages.0.content.1", "content part type 'image_url' is not supported (this model takes text only)"),
    ([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
     "messages.0.content.0", "content part type 'input_audio' is not supported (this model takes text only)"),
    ([{"type": "text"}], "messages.0.content.0.text", "messages.0.content.0.text is required"),
    ([], "messages.0.content", "empty array"),
])
def test_chat_content_parts_name_the_part(server, content: list, param: str, message: str) -> None:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1}
    response = requests.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["message"].startswith(f"{param}: ") or error["message"] == message


def test_chat_empty_role_is_400(server) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "", "content": "hi"}], "max_tokens": 1}
    response = requests.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.1.role", response.text


LONG_TGI = {"inputs": "Count to ten thousand: 1, 2, 3,", "parameters": {"max_new_tokens": 400}}


def _failures(base_url: str) -> dict[str, float]:
    return {labels[0][1]: value for (name, labels), value in scrape_metrics(base_url).items()
            if name == "tgi_request_failure"}


def _leave_while_running(server, path: str) -> None:
    """POST `path` with a long generation and close the connection once it runs."""
    running = ("pagedserve:num_requests_running", (("model_name", "SmolLM2-135M-Instruct"),))
    body = json.dumps(LONG_TGI).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while scrape_metrics(server.base_url)[running] == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
    wait_idle(server.base_url, timeout=30)


def test_tgi_client_leaving_generate_is_dropped_not_validation(server) -> None:
    wait_idle(server.base_url)
    before = _failures(server.base_url)
    _leave_while_running(server, "/generate")
    deadline = time.monotonic() + 10
    while (after := _failures(server.base_url)).get("dropped", 0) == before.get("dropped", 0):
        assert time.monotonic() < deadline, f"no failure counted: {after}"
        time.sleep(0.05)
    assert after.get("dropped", 0) == before.get("dropped", 0) + 1
    assert after["validation"] == before["validation"]
    _leave_while_running(server, "/generate_stream")
    assert _failures(server.base_url)["validation"] == before["validation"]


def test_tgi_client_leaving_generate_stream_is_dropped(server) -> None:
    wait_idle(server.base_url)
    before = _failures(server.base_url).get("dropped", 0)
    _leave_while_running(server, "/generate_stream")
    time.sleep(0.5)
    assert _failures(server.base_url).get("dropped", 0) == before + 1
