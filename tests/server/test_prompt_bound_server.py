"""A 15 MB text prompt through the float32 `server` (a real HTTP server on the default model,
max_model_len 8192): its 400 (TGI: 422) names the parameter and comes from the prompt's length
(prompt_bound.PromptLengthBound), not after tokenizing it whole (13-33 s of an input thread
each, which delayed every request behind them; the message's "at least" says which: the count
came from the bound); a plain request sent beside them is answered. How little of the text is
tokenized is pinned in tests/unit/test_prompt_bound.py by counting characters, not by time."""
from __future__ import annotations

import json
import threading

import requests

MODEL = "SmolLM2-135M-Instruct"
TEXT = "the capital of France is Paris " * (15_000_000 // 31)   # 15 MB, ~3M tokens
PLAIN = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}


def _post(server, path: str, data: bytes) -> requests.Response:
    return requests.post(f"{server.base_url}{path}", data=data, headers={"Content-Type": "application/json"},
                         timeout=120)


def _check_refused(path: str, response: requests.Response) -> None:
    if path.startswith("/generate"):   # TGI's shape: a 422 validation error
        assert response.status_code == 422, (path, response.text[:500])
        body = response.json()
        assert body["error_type"] == "validation" and "`inputs` must have less than 8191 tokens" in body["error"]
        assert "Given: at least" in body["error"], body["error"]
    else:
        assert response.status_code == 400, (path, response.text[:500])
        error = response.json()["error"]
        assert error["param"] == "prompt", (path, error)
        assert "max_model_len is 8192" in error["message"] and "at least" in error["message"], (path, error)


def test_a_15_mb_prompt_is_refused_at_once_and_a_plain_request_beside_it_is_answered(server) -> None:
    reference = requests.post(f"{server.base_url}/v1/completions", json=PLAIN, timeout=60)
    assert reference.status_code == 200, reference.text
    bodies = {"/v1/completions": {"model": MODEL, "prompt": TEXT, "max_tokens": 4},
              "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": TEXT}],
                                       "max_tokens": 4},
              "/generate": {"inputs": TEXT, "parameters": {"max_new_tokens": 4}}}
    data = {path: json.dumps(body).encode() for path, body in bodies.items()}
    results: dict[str, requests.Response] = {}

    def send(path: str) -> None:
        results[path] = _post(server, path, data[path])

    threads = [threading.Thread(target=send, args=(path,), daemon=True) for path in data]
    for thread in threads:
        thread.start()
    plain = requests.post(f"{server.base_url}/v1/completions", json=PLAIN, timeout=60)
    for thread in threads:
        thread.join(timeout=120)
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["text"] == reference.json()["choices"][0]["text"]
    assert set(results) == set(data)
    for path, response in results.items():
        _check_refused(path, response)


def test_a_15_mb_prompt_on_the_other_text_paths_is_refused_at_once(server) -> None:
    """A list of prompts (the long one second), a beam search, and TGI's stream."""
    for path, body in (("/v1/completions", {"model": MODEL, "prompt": ["Hello", TEXT], "max_tokens": 4}),
                       ("/v1/completions", {"model": MODEL, "prompt": TEXT, "max_tokens": 4, "n": 2,
                                            "use_beam_search": True}),
                       ("/generate_stream", {"inputs": TEXT, "parameters": {"max_new_tokens": 4}})):
        _check_refused(path, _post(server, path, json.dumps(body).encode()))
