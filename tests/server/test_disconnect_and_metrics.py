"""Client disconnects abort their requests (blocks freed, kv_cache_usage_perc back to 0);
/metrics parses with prometheus_client and its counters follow the requests made; an idle
server does not spin."""
from __future__ import annotations

import json
import os
import socket
import time

import requests

from tests.server.conftest import scrape_metrics, wait_idle

LABEL = (("model_name", "SmolLM2-135M-Instruct"),)
LONG = {"prompt": "Count to ten thousand: 1, 2, 3,", "max_tokens": 4000, "ignore_eos": True, "temperature": 0}


def _abort_count(samples: dict) -> float:
    return samples[("pagedserve:request_success_total", (("finished_reason", "abort"), *LABEL))]


def test_stream_disconnect_aborts_and_frees_blocks(server) -> None:
    before = _abort_count(wait_idle(server.base_url))
    with requests.post(f"{server.base_url}/v1/completions", json={**LONG, "stream": True}, stream=True,
                       timeout=30) as response:
        assert response.status_code == 200
        events = response.iter_lines()
        first = next(line for line in events if line)
        assert json.loads(first[len(b"data: "):])["choices"][0]["text"] is not None
        busy = scrape_metrics(server.base_url)
        assert busy[("pagedserve:kv_cache_usage_perc", LABEL)] > 0
        assert busy[("pagedserve:num_requests_running", LABEL)] == 1
    # 4000 tokens would take minutes on CPU: idle within 30 s means the request was aborted
    after = wait_idle(server.base_url, timeout=30)
    assert after[("pagedserve:kv_cache_usage_perc", LABEL)] == 0
    assert _abort_count(after) == before + 1


def test_non_stream_disconnect_aborts(server) -> None:
    before = _abort_count(wait_idle(server.base_url))
    body = json.dumps(LONG).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while scrape_metrics(server.base_url)[("pagedserve:num_requests_running", LABEL)] == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
    after = wait_idle(server.base_url, timeout=30)
    assert _abort_count(after) == before + 1


def test_token_counters_move_while_a_request_runs(server) -> None:
    """prompt_tokens_total, generation_tokens_total and the time to first token are counted as
    the engine runs (vLLM V1), not when requests end: a non-streaming request (which the core
    reports only at its end) moves them while it runs, and the tokens it got before its client
    left stay counted."""
    prompt, generation = ("pagedserve:prompt_tokens_total", LABEL), ("pagedserve:generation_tokens_total", LABEL)
    ttft = ("pagedserve:time_to_first_token_seconds_count", LABEL)
    before = wait_idle(server.base_url)
    num_prompt = requests.post(f"{server.base_url}/tokenize", json={"prompt": LONG["prompt"]}, timeout=30).json()["count"]
    body = json.dumps(LONG).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while True:
            busy = scrape_metrics(server.base_url)
            if busy[generation] - before[generation] >= 4:
                break
            assert time.monotonic() < deadline, "no generated token was counted while the request ran"
            time.sleep(0.05)
        assert busy[("pagedserve:num_requests_running", LABEL)] == 1   # 4000 tokens: minutes on CPU
        assert busy[prompt] - before[prompt] == num_prompt
        assert busy[ttft] - before[ttft] == 1
    after = wait_idle(server.base_url, timeout=30)
    assert after[ttft] - before[ttft] == 1   # once, not again when it ended
    assert after[generation] >= busy[generation]   # the aborted request's tokens stay counted
    assert after[prompt] - before[prompt] == num_prompt


def test_metrics_counters_move(server) -> None:
    before = wait_idle(server.base_url)
    response = requests.post(f"{server.base_url}/v1/completions", timeout=60, json={
        "prompt": "Metrics test: the quick brown fox", "max_tokens": 7, "temperature": 0})
    usage = response.json()["usage"]
    after = wait_idle(server.base_url)

    def delta(name: str, labels: tuple = LABEL) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert delta("pagedserve:prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("pagedserve:generation_tokens_total") == usage["completion_tokens"] == 7
    assert delta("pagedserve:request_success_total", (("finished_reason", "length"), *LABEL)) == 1
    assert delta("pagedserve:prefix_cache_queries_total") >= usage["prompt_tokens"]
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
                      "request_queue_time_seconds"):
        assert delta(f"pagedserve:{histogram}_count") == 1, histogram
        assert delta(f"pagedserve:{histogram}_sum") >= 0, histogram
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert after[(f"pagedserve:{gauge}", LABEL)] == 0
    assert ("pagedserve:num_preemptions_total", LABEL) in after
    assert ("pagedserve:prefix_cache_hits_total", LABEL) in after
    assert after[("pagedserve:kv_offload_host_usage_perc", LABEL)] == 0   # the host tier, next to the KV metrics
    for counter in ("blocks_swapped_out", "blocks_swapped_in", "host_prefix_hits"):
        assert (f"pagedserve:kv_offload_{counter}_total", LABEL) in after, counter


def test_idle_server_does_not_spin(server) -> None:
    wait_idle(server.base_url)
    stat = f"/proc/{server.process.pid}/stat"

    def cpu_seconds() -> float:
        fields = open(stat).read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime

    start = cpu_seconds()
    time.sleep(2.0)
    assert cpu_seconds() - start < 0.3
