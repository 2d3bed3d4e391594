"""The engine core in its own process (`serve --engine-process`, frontend/core_client.py),
through real server processes: the same greedy text as the offline engine, structured outputs
across the pipe, /metrics and /debug/steps fed from the core process; a killed core fails its
open requests with an error and the server exits; a killed server leaves no core behind.
Also the chat stream's first chunk (the role) goes out only with the first output, as vLLM's,
and `--scheduling-policy priority`: a request's priority crosses the pipe and orders the queue; an aborted
non-streaming request's tokens reach /metrics' per-request histogram."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Iterator

import psutil
import pytest
import requests

from pagedserve import SamplingParams
from tests.server.conftest import ServerProcess, serving, start_server, wait_idle

MODEL = "SmolLM2-135M-Instruct"
LABEL = (("model_name", MODEL),)
SMALL = ("--engine-process", "--dtype", "float32", "--max-model-len", "1024", "--num-kv-blocks", "128")


@pytest.fixture(scope="module")
def one_seq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One sequence at a time: a second request waits until the first one ends (priority
    scheduling: requests without a priority are first come, first served as by default)."""
    yield from serving(tmp_path_factory, "engine_process", *SMALL, "--max-num-seqs", "1",
                       "--scheduling-policy", "priority")


def _core_of(server: ServerProcess) -> psutil.Process:
    [core] = [c for c in psutil.Process(server.process.pid).children() if "core_process" in " ".join(c.cmdline())]
    return core


def _events(response: requests.Response) -> Iterator[dict | str]:
    for line in response.iter_lines():
        if line:
            data = line[len(b"data: "):]
            yield data.decode() if data == b"[DONE]" else json.loads(data)


def test_greedy_text_and_structured_output_match_offline(one_seq, offline_llm) -> None:
    prompt = "The capital of France is"
    reference = offline_llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0}
    result = requests.post(f"{one_seq.base_url}/v1/completions", json=body, timeout=60).json()
    assert result["choices"][0]["text"] == reference[0].outputs[0].text
    chosen = requests.post(f"{one_seq.base_url}/v1/completions", timeout=60, json={
        **body, "structured_outputs": {"choice": ["Paris", "Lyon"]}}).json()["choices"][0]["text"]
    assert chosen in ("Paris", "Lyon")   # the compiled grammar crossed the pipe to the core's matcher
    samples = wait_idle(one_seq.base_url)
    assert samples[("pagedserve:iteration_tokens_total_count", LABEL)] >= 12
    steps = requests.get(f"{one_seq.base_url}/debug/steps", timeout=10).json()
    assert steps["steps"] >= 12 and steps["decode_step_ms"]["p50"] > 0


def test_chat_role_chunk_goes_out_with_the_first_output(one_seq) -> None:
    """vLLM sends the role with the first output, so a client's first chunk marks the first
    token: while another request holds the only sequence slot, nothing may arrive."""
    url = f"{one_seq.base_url}/v1/completions"
    holder = requests.post(url, json={"model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 900, "ignore_eos": True,
                                      "stream": True}, stream=True, timeout=60)
    holder_events = _events(holder)
    next(holder_events)   # the slot is taken
    received: list[dict | str] = []

    def chat() -> None:
        with requests.post(f"{one_seq.base_url}/v1/chat/completions", stream=True, timeout=60, json={
                "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                "temperature": 0, "stream": True}) as response:
            received.extend(_events(response))

    reader = threading.Thread(target=chat)
    reader.start()
    time.sleep(1.0)
    assert received == [], "a chunk went out before the request was even scheduled"
    holder.close()   # abort: the chat request gets the slot
    reader.join(60)
    assert not reader.is_alive()
    assert received[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert received[1]["choices"][0]["delta"]["content"]   # the first token's text right behind it
    assert received[-1] == "[DONE]"


def test_priority_orders_the_queue_across_the_core_pipe(one_seq) -> None:
    """While a request holds the only slot, a priority 10 completion and then a priority -5 chat
    wait; when the slot frees, the later, more urgent one runs first, whole, then the other."""
    holder = requests.post(f"{one_seq.base_url}/v1/completions", json={
        "model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 900, "ignore_eos": True, "stream": True},
        stream=True, timeout=60)
    holder_events = _events(holder)   # kept: a dropped generator would close the stream
    next(holder_events)   # the slot is taken
    finished: list[str] = []
    errors: list[str] = []

    def send(name: str, path: str, body: dict) -> None:
        response = requests.post(f"{one_seq.base_url}{path}", timeout=120, json={
            "model": MODEL, "max_tokens": 8, "ignore_eos": True, **body})
        (finished if response.status_code == 200 else errors).append(name if response.status_code == 200
                                                                     else response.text)

    low = threading.Thread(target=send, args=("low", "/v1/completions", {"prompt": "Hello", "priority": 10}))
    high = threading.Thread(target=send, args=("high", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "priority": -5}))
    low.start()
    time.sleep(1.0)   # low is queued first
    high.start()
    time.sleep(1.0)
    assert finished == [] and errors == []
    holder.close()   # abort: the slot frees
    for thread in (low, high):
        thread.join(120)
    assert errors == [] and finished == ["high", "low"]
    bad = requests.post(f"{one_seq.base_url}/v1/completions", timeout=30, json={
        "model": MODEL, "prompt": "Hi", "max_tokens": 1, "priority": 2**63})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "priority"


def test_an_aborted_final_only_request_counts_the_cores_tokens(one_seq) -> None:
    """A non-streaming request is final-only (the core reports it once, at its end): its client
    gone, the server aborts it, and its tokens still reach the per-request histogram, exactly the
    engine's count, from the core process's answer to the abort."""
    before = wait_idle(one_seq.base_url)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{one_seq.base_url}/v1/completions", timeout=(10, 4.0), json={
            "model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 900, "ignore_eos": True})
    after = wait_idle(one_seq.base_url)

    def delta(name: str, labels: tuple = LABEL) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)
    assert delta("pagedserve:request_success_total", (("finished_reason", "abort"), *LABEL)) == 1
    generated = delta("pagedserve:generation_tokens_total")
    assert 0 < generated < 900 and delta("pagedserve:request_generation_tokens_sum") == generated


def test_killed_core_fails_open_requests_and_the_server_exits(tmp_path) -> None:
    server = start_server(tmp_path, "killed_core", *SMALL)
    try:
        server.wait_healthy()
        with requests.post(f"{server.base_url}/v1/completions", stream=True, timeout=60, json={
                "model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 900, "ignore_eos": True, "stream": True}) as r:
            events = _events(r)
            next(events)
            _core_of(server).kill()
            rest = list(events)   # ends: no hang
        assert "error" in rest[-2] and "engine core" in rest[-2]["error"]["message"] and rest[-1] == "[DONE]"
        assert server.process.wait(timeout=20) == 1
    finally:
        server.stop()


def test_killed_server_takes_its_core_along(tmp_path) -> None:
    server = start_server(tmp_path, "killed_server", *SMALL)
    try:
        server.wait_healthy()
        core = _core_of(server)
        os.kill(server.process.pid, signal.SIGKILL)
        core.wait(timeout=20)   # the core sees its pipe close and exits (psutil.TimeoutExpired otherwise)
    finally:
        server.stop()


def test_a_sigterm_to_the_whole_group_lets_open_requests_finish(tmp_path) -> None:
    """systemd's stop sends SIGTERM to every process of the unit, the engine core's too: the core
    leaves its end to the server, whose graceful shutdown lets the open request finish (before,
    the core died at once and the request got an engine-core error), then stops the core. The
    request's 60 tokens get --shutdown-timeout 120 (more than the default 3 s allows even on a quiet
    machine; a loaded CI machine once cut 20 tokens short at 3 s)."""
    server = start_server(tmp_path, "group_sigterm", *SMALL, "--shutdown-timeout", "120", new_session=True)
    try:
        server.wait_healthy()
        core = _core_of(server)
        with requests.post(f"{server.base_url}/v1/completions", stream=True, timeout=60, json={
                "model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 60, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            events = _events(r)
            first = next(events)
            os.killpg(server.process.pid, signal.SIGTERM)
            rest = list(events)
        chunks = [first] + [e for e in rest if isinstance(e, dict)]
        assert not [c for c in chunks if "error" in c], chunks
        assert rest[-1] == "[DONE]" and chunks[-1]["usage"]["completion_tokens"] == 60
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert server.process.wait(timeout=30) == -signal.SIGTERM   # as SIGTERM ends a process
        core.wait(timeout=20)
    finally:
        server.stop()


def test_shutdown_timeout_0_cancels_open_requests_at_once(tmp_path) -> None:
    """vLLM's --shutdown-timeout 0: SIGTERM cancels an open stream instead of waiting for its 900
    tokens (it ends with the shutdown's error event, test_shutdown_open_request.py); the server
    still ends as SIGTERM does, within seconds."""
    server = start_server(tmp_path, "shutdown_0", *SMALL, "--no-engine-process", "--shutdown-timeout", "0")
    try:
        server.wait_healthy()
        with requests.post(f"{server.base_url}/v1/completions", stream=True, timeout=60, json={
                "model": MODEL, "prompt": "1, 2, 3,", "max_tokens": 900, "ignore_eos": True, "stream": True}) as r:
            events = _events(r)
            next(events)
            os.kill(server.process.pid, signal.SIGTERM)
            rest = list(events)
        assert rest[-1] == "[DONE]" and rest[-2]["error"]["code"] == 503, rest[-3:]
        # what was on the wire, or made in uvicorn's 0.1 s tick before its shutdown starts (the default
        # 3 s let 17 through on a quiet 2-core machine)
        assert len(rest) - 2 <= 5
        assert server.process.wait(timeout=20) == -signal.SIGTERM
    finally:
        server.stop()
