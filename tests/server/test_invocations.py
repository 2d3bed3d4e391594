"""SageMaker's routes on a generating server, over real HTTP: GET|POST /ping answers as /health,
and POST /invocations answers each body as the route its fields name (chat, completions, TGI's
generate and generate_stream), with the same greedy text; a body naming none of them is a 400
naming `body`; the key guards /invocations and leaves /ping open."""
from __future__ import annotations

import json

import requests

from tests.server.conftest import API_KEY, GOOD, GoodTraffic

CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0.0}
COMPLETION = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
TGI = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8, "decoder_input_details": False}}


def _post(server, path: str, body, **kwargs) -> requests.Response:
    return requests.post(f"{server.base_url}{path}", json=body, timeout=60, **kwargs)


def test_ping_is_health(server, auth_server) -> None:
    for url in (server.base_url, auth_server.base_url):   # open, as /health, under a key too
        assert requests.get(f"{url}/ping", timeout=10).status_code == 200
        assert requests.post(f"{url}/ping", timeout=10).status_code == 200


def test_invocations_answers_as_the_route_its_body_names(server) -> None:
    chat = _post(server, "/invocations", CHAT)
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"
    assert chat.json()["choices"][0]["message"] == _post(server, "/v1/chat/completions", CHAT).json()["choices"][0][
        "message"]
    completion = _post(server, "/invocations", COMPLETION)
    assert completion.json()["object"] == "text_completion"
    assert completion.json()["choices"][0]["text"] == _post(server, "/v1/completions", COMPLETION).json()[
        "choices"][0]["text"]
    [generated] = _post(server, "/invocations", TGI).json()   # TGI's `/` answers a list of one
    assert generated == _post(server, "/generate", TGI).json() and generated["generated_text"]
    with requests.post(f"{server.base_url}/invocations", json={**TGI, "stream": True}, stream=True,
                       timeout=60) as response:
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith(b"data:")]
    assert response.status_code == 200 and events[-1]["generated_text"] == generated["generated_text"]
    embeddings = _post(server, "/invocations", {"input": "x"})   # a generating server: as /v1/embeddings answers
    assert embeddings.status_code == 400 and embeddings.json()["error"]["param"] == "model"


def test_invocations_refuses_a_body_it_cannot_place(server, auth_server) -> None:
    """While good streams run: each is answered alone, and they finish with the text they get alone."""
    expected = _post(server, "/v1/completions", GOOD).json()["choices"][0]["text"]
    with GoodTraffic(server.base_url) as good:
        for data in (json.dumps({"text": "hi"}), json.dumps(["messages"]), "{not json"):
            response = requests.post(f"{server.base_url}/invocations", data=data, timeout=30,
                                     headers={"Content-Type": "application/json"})
            assert response.status_code == 400, (data, response.text)
            error = response.json()["error"]
            assert error["param"] == "body" and "messages" in error["message"] and "inputs" in error["message"]
        bad = _post(server, "/invocations", {**CHAT, "temperature": -1})   # the route's own checks, its own answer
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
    good.check(expected)
    assert _post(auth_server, "/invocations", CHAT).status_code == 401
    ok = _post(auth_server, "/invocations", CHAT, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and ok.json()["object"] == "chat.completion"
