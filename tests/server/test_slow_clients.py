"""Clients that send too little, through a real server and raw sockets: a connection that
sends nothing, part of its headers or part of its body is closed after --timeout-request-read
(a stalled body answered 408 in the error body; so is a body trickled a byte at a time below
connections.MIN_BODY_RATE) while other clients are served and long
responses are not cut; a client that leaves mid-body is no server error (no traceback); at
the open-file limit the accept error is one log line, not a flood; the soft open-file limit
is raised to the hard one at start-up.

One server with a 1 s deadline and debug logging (its log is read), started with a lowered
soft open-file limit."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.server.conftest import ServerProcess, start_server

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and sets another process's limits")

DEADLINE_S = 1.0
LOWERED_SOFT_LIMIT = 1024


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = hard != resource.RLIM_INFINITY and hard > LOWERED_SOFT_LIMIT   # then the server must raise it
    if lowered:
        resource.setrlimit(resource.RLIMIT_NOFILE, (LOWERED_SOFT_LIMIT, hard))   # inherited by the server
    try:
        proc = start_server(tmp_path_factory.mktemp("slow_clients"), "slow_clients",
                            "--timeout-request-read", str(DEADLINE_S), "--log-level", "debug")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    proc.lowered_limit = lowered   # type: ignore[attr-defined]
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()


def _connect(server: ServerProcess, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def _read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed."""
    data = b""
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.monotonic()


def _log_since(server: ServerProcess, offset: int) -> str:
    return server.log_path.read_bytes()[offset:].decode(errors="replace")


def _stream_past_the_deadline(server: ServerProcess) -> tuple[float, int]:
    """A long streamed generation read for 2.5 deadlines, then dropped: when its last chunk
    came (seconds after the request was sent) and how many chunks came."""
    start = time.monotonic()
    last, chunks = 0.0, 0
    body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with requests.post(f"{server.base_url}/v1/completions", json=body, stream=True, timeout=30) as response:
        assert response.status_code == 200, response.text
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                last, chunks = time.monotonic() - start, chunks + 1
                if last > 2.5 * DEADLINE_S and chunks > 1:
                    break
    return last, chunks


def _slow_non_streamed(server: ServerProcess) -> str:
    """A long non-streamed generation: the client gives up after 2 deadlines; the server must
    not have closed the connection before (ConnectionError) — its body arrived whole."""
    body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}
    try:
        response = requests.post(f"{server.base_url}/v1/completions", json=body, timeout=(5, 2 * DEADLINE_S))
    except requests.ReadTimeout:
        return "still generating"
    return f"answered {response.status_code}"


def _trickled_body(server: ServerProcess) -> tuple[bytes, float]:
    """A body of ~1.2 KB sent in 4 pieces 0.4 deadlines apart (1.6 in all): progress, never a stall,
    and above MIN_BODY_RATE past the first deadline."""
    body = json.dumps({"prompt": "Hello there, world " * 60}).encode()
    sock = _connect(server, b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    start, piece = time.monotonic(), -(-len(body) // 4)
    for i in range(0, len(body), piece):
        time.sleep(0.4 * DEADLINE_S)
        sock.sendall(body[i:i + piece])
    data, _ = _read_until_closed(sock)
    return data, time.monotonic() - start


def _body_a_byte_at_a_time(server: ServerProcess) -> tuple[bytes, float, float]:
    """A 400-byte body sent a byte every 0.3 deadlines, never stalling, until the server stops it:
    what it answered, and when it started and closed."""
    sock = _connect(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 400\r\n\r\n")
    start = time.monotonic()
    try:
        for _ in range(400):
            time.sleep(0.3 * DEADLINE_S)
            sock.sendall(b" ")
    except OSError:   # the server closed the connection
        pass
    data, closed = _read_until_closed(sock)
    return data, start, closed


def test_slow_connections_are_closed_while_others_are_served(slow) -> None:
    with ThreadPoolExecutor(4) as pool:
        stream = pool.submit(_stream_past_the_deadline, slow)
        non_streamed = pool.submit(_slow_non_streamed, slow)
        trickled = pool.submit(_trickled_body, slow)
        bytewise = pool.submit(_body_a_byte_at_a_time, slow)
        opened = time.monotonic()
        idle = _connect(slow)
        partial_headers = _connect(slow, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        partial_body = _connect(slow, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                      b"\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        # others are served meanwhile
        health = requests.get(f"{slow.base_url}/health", timeout=5)
        tokens = requests.post(f"{slow.base_url}/tokenize", json={"prompt": "Hi"}, timeout=5)
        assert health.status_code == 200 and tokens.status_code == 200, tokens.text

        closed = {name: _read_until_closed(sock) for name, sock in
                  (("idle", idle), ("partial_headers", partial_headers), ("partial_body", partial_body))}
        for name, (data, when) in closed.items():
            assert 0.8 * DEADLINE_S < when - opened < DEADLINE_S + 4, (name, when - opened)
        assert closed["idle"][0] == closed["partial_headers"][0] == b""   # nothing to answer: just closed
        head, _, payload = closed["partial_body"][0].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), head
        error = json.loads(payload)["error"]
        assert error["type"] == "RequestTimeoutError" and error["code"] == 408 and "stalled" in error["message"]

        last, chunks = stream.result(timeout=60)
        assert last > 2 * DEADLINE_S and chunks > 1, (last, chunks)   # still streaming well past the deadline
        assert non_streamed.result(timeout=60) in ("still generating", "answered 200")
        data, took = trickled.result(timeout=60)
        assert took > DEADLINE_S and data.startswith(b"HTTP/1.1 200 "), data   # slow but steady: served
        assert json.loads(data.partition(b"\r\n\r\n")[2])["count"] > 0
        # a byte every 0.3 deadlines never stalls, but falls below MIN_BODY_RATE: a 408 after the first deadline
        data, start, closed = bytewise.result(timeout=60)
        assert 0.8 * DEADLINE_S < closed - start < DEADLINE_S + 4, closed - start
        head, _, payload = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), head
        error = json.loads(payload)["error"]
        assert error["code"] == 408 and "too slowly" in error["message"] and "500 bytes a second" in error["message"]


# the routes that read a body, and a body cut short
ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/generate", "/generate_stream", "/",
          "/tokenize", "/detokenize"]


def test_client_leaving_mid_body_is_no_server_error(slow) -> None:
    offset = slow.log_path.stat().st_size
    for path in ROUTES:
        sock = _connect(slow, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 100\r\n\r\n{\"inputs\": \"Hel" % path.encode())
        time.sleep(0.05)   # the route is reading the body
        sock.close()
    deadline = time.monotonic() + 10   # each route logs the disconnect at debug level (the exception's name)
    while _log_since(slow, offset).count("(ClientDisconnect)") < len(ROUTES):
        assert time.monotonic() < deadline, _log_since(slow, offset)[-4000:]
        time.sleep(0.05)
    log = _log_since(slow, offset)
    for bad in ("Traceback", "ERROR", "unexpected error", "Exception in ASGI application"):
        assert bad not in log, log[-4000:]
    assert requests.get(f"{slow.base_url}/health", timeout=5).status_code == 200


def test_open_file_limit_raised_and_accept_errors_do_not_flood_the_log(slow) -> None:
    import resource
    pid = slow.process.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    if slow.lowered_limit:   # type: ignore[attr-defined]
        assert soft == hard > LOWERED_SOFT_LIMIT   # started at 1024, raised at start-up

    offset = slow.log_path.stat().st_size
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 8, hard))   # a few connections from EMFILE
    socks: list[socket.socket] = []
    try:
        socks = [_connect(slow) for _ in range(40)]   # the kernel completes them all; the server can't accept
        time.sleep(2.5 * DEADLINE_S)   # accept keeps failing (asyncio retries each second)
        log = _log_since(slow, offset)
    finally:
        for sock in socks:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert 1 <= log.count("Too many open files") <= 2, log[-4000:]   # reported, once per 10 s
    assert "Traceback" not in log, log[-4000:]
    # the idle connections it did accept went after the deadline; the server serves again
    assert requests.get(f"{slow.base_url}/health", timeout=10).status_code == 200
