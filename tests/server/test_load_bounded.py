"""Issue 16's "done when": 64 concurrent streams (half disconnecting after their first
chunk) plus a bad request every 200 ms against one server; at the end nothing runs or
waits, the KV cache is empty, no 5xx was seen, and every stream read to the end has the
greedy text of the same request sent alone. Bounded: 8 tokens a stream, --max-num-seqs 8
(so the 64 queue), every thread joined with a timeout, the whole test under ~90 s.

And one long prompt does not hold a short one back: with a 16-token budget a step, a
480-token prompt's prefill takes 30 steps, and a short request sent once it runs is
answered before it ends (core/scheduler.py: a long prefill leaves shorter work half the
budget)."""
from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from tests.server.conftest import ServerProcess, scrape_metrics, serving, wait_idle

NUM_STREAMS = 64
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are",
           "My favourite food is", "In 1492, Columbus", "The quick brown fox", "Water boils at"]
BAD_REQUESTS = [   # (path, raw JSON body): each must be a 4xx
    ("/v1/completions", '{"prompt": "abc\\ud800def", "max_tokens": 2}'),
    ("/v1/completions", '{"prompt": %s}' % ("[" * 20_000 + "]" * 20_000)),
    ("/v1/completions", '{"prompt": "a", "n": true}'),
    ("/v1/completions", '{"prompt": "a", "temperature": Infinity}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a"}], "logprobs": true, '
                             '"top_logprobs": 50000}'),
    ("/v1/completions", '{"prompt": "a", "max_tokens": null, "prompt_logprobs": 50000}'),
    ("/generate", '{"inputs": "a", "parameters": {"do_sample": true, "seed": 18446744073709551616}}'),
    ("/generate_stream", '{"inputs": "a", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}'),
    ("/v1/completions", '{"prompt": "a", "logit_bias": {%s}}' % ", ".join(f'"{i}": 1' for i in range(2000))),
    ("/tokenize", '{"messages": [{"role": "user", "content": "a"}], "chat_template": '
                  '"{{ range(10**12) | length }}"}'),
]
TIME_LIMIT_S = 90.0


@pytest.fixture(scope="module")
def load_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    yield from serving(tmp_path_factory, "load", "--max-num-seqs", "8", "--max-model-len", "512",
                        "--num-kv-blocks", "256", "--dtype", "float32", "--max-num-batched-tokens", "16")


def _body(prompt: str, stream: bool) -> dict:
    return {"prompt": prompt, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "stream": stream}


def test_64_streams_with_disconnects_and_bad_requests(load_server) -> None:
    base = load_server.base_url
    alone = {}
    for prompt in PROMPTS:
        response = requests.post(f"{base}/v1/completions", json=_body(prompt, False), timeout=60)
        assert response.status_code == 200, response.text
        alone[prompt] = response.json()["choices"][0]["text"]

    results: dict[int, tuple[int, str, bool]] = {}   # stream -> (status, text, read to the end)
    bad_statuses: list[tuple[str, int]] = []
    deadline = time.monotonic() + TIME_LIMIT_S

    def stream(index: int) -> None:
        prompt, disconnect = PROMPTS[index % len(PROMPTS)], index % 2 == 1
        status, text, complete = -1, "", False
        try:
            with requests.post(f"{base}/v1/completions", json=_body(prompt, True), stream=True,
                               timeout=TIME_LIMIT_S) as response:
                status = response.status_code
                for line in response.iter_lines():
                    if line == b"data: [DONE]":
                        complete = True
                        break
                    if line.startswith(b"data: "):
                        chunk = json.loads(line[6:])
                        assert "error" not in chunk, chunk
                        text += "".join(c["text"] for c in chunk["choices"])
                        if disconnect:
                            break   # closing the response drops the connection
        except requests.RequestException as exc:
            text = f"failed: {exc}"
        results[index] = (status, text, complete)

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(NUM_STREAMS)]
    for thread in threads:
        thread.start()

    sent = 0
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        path, data = BAD_REQUESTS[sent % len(BAD_REQUESTS)]
        response = requests.post(f"{base}{path}", data=data, headers={"Content-Type": "application/json"},
                                 timeout=60)
        bad_statuses.append((path, response.status_code))
        sent += 1
        time.sleep(0.2)
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic()))

    assert len(results) == NUM_STREAMS, "a stream did not finish within the time limit"
    assert all(status == 200 for status, _, _ in results.values()), results
    for index, (_, text, complete) in results.items():
        if index % 2 == 0:
            assert complete and text == alone[PROMPTS[index % len(PROMPTS)]], (index, text)
    assert sent >= 3 and all(400 <= status < 500 for _, status in bad_statuses), bad_statuses
    samples = wait_idle(base, timeout=30)
    assert samples[("pagedserve:num_requests_running", (("model_name", _model(samples)),))] == 0
    assert samples[("pagedserve:kv_cache_usage_perc", (("model_name", _model(samples)),))] == 0
    assert requests.get(f"{base}/health", timeout=10).status_code == 200


def _model(samples: dict) -> str:
    return next(dict(labels)["model_name"] for (name, labels), _ in samples.items()
                if name == "pagedserve:num_requests_running")


def test_a_short_request_is_answered_while_a_long_prompt_is_still_in_prefill(load_server) -> None:
    base = load_server.base_url
    short = _body(PROMPTS[0], False) | {"max_tokens": 3}
    alone = requests.post(f"{base}/v1/completions", json=short, timeout=60)
    assert alone.status_code == 200, alone.text
    wait_idle(base, timeout=30)
    done: dict[str, tuple[float, int, str]] = {}

    def send(name: str, body: dict) -> None:
        response = requests.post(f"{base}/v1/completions", json=body, timeout=TIME_LIMIT_S)
        done[name] = (time.monotonic(), response.status_code, response.text)

    long_body = {"prompt": " hello" * 480, "max_tokens": 1, "temperature": 0.0}
    long_thread = threading.Thread(target=send, args=("long", long_body), daemon=True)
    long_thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:   # the long prompt runs: its prefill has ~30 steps to go
        samples = scrape_metrics(base)
        if samples[("pagedserve:num_requests_running", (("model_name", _model(samples)),))] >= 1:
            break
        time.sleep(0.01)
    send("short", short)
    long_thread.join(timeout=TIME_LIMIT_S)
    assert done["long"][1] == 200 and done["short"][1] == 200, done
    assert json.loads(done["long"][2])["usage"]["prompt_tokens"] >= 480
    assert done["short"][0] < done["long"][0], "the short request waited for the long prompt's prefill"
    assert json.loads(done["short"][2])["choices"][0]["text"] == alone.json()["choices"][0]["text"]
