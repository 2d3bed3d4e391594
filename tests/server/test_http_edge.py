"""The one HTTP edge of both APIs: the error table answers each error class in the route
family's body; one auth middleware guards every route that touches the model; chat
content parts are flattened by the frontend's one function (online == offline);
cache_salt reaches the engine."""
from __future__ import annotations

import json

import pytest
import requests

from pagedserve import SamplingParams
from pagedserve.errors import (EngineDeadError, OverloadedError, RequestAbortedError, RequestFailedError,
                               ValidationError)
from pagedserve.server.errors import (API, ClientDisconnected, IncompleteGenerationError, RequestTooLargeError,
                                      UnauthorizedError, describe)
from tests.server.conftest import API_KEY, wait_idle

TWO_PARTS = [{"role": "user", "content": [{"type": "text", "text": "first part"},
                                          {"type": "text", "text": "second part"}]}]


@pytest.mark.parametrize("error,openai,tgi", [
    (ValidationError("bad", "x"), (400, "BadRequestError"), (422, "validation")),
    (OverloadedError("Model is overloaded"), (503, "ServiceUnavailableError"), (429, "overloaded")),
    (EngineDeadError("dead"), (503, "EngineDeadError"), (424, "generation")),
    (RequestFailedError("cause"), (500, "InternalServerError"), (424, "generation")),
    (RequestAbortedError(), (500, "RequestAbortedError"), (500, "incomplete_generation")),
    (UnauthorizedError("no key", "api_key"), (401, "AuthenticationError"), (401, "authentication")),
    (RequestTooLargeError("big"), (413, "RequestTooLargeError"), (413, "validation")),
    (ClientDisconnected(), (499, "ClientClosedRequest"), (499, "dropped")),
    (IncompleteGenerationError("cut"), (500, "InternalServerError"), (500, "incomplete_generation")),
    (KeyError("surprise"), (500, "InternalServerError"), (500, "generation")),
])
def test_error_table_answers_both_families(error, openai, tgi) -> None:
    info = describe(error, API.OPENAI)
    body = info.body()["error"]
    assert (info.status, info.type) == openai == (body["code"], body["type"])
    assert body["message"] and body["param"] == getattr(error, "param", None)
    info = describe(error, API.TGI)
    assert (info.status, info.type) == tgi
    assert info.body() == {"error": info.message, "error_type": tgi[1]} and info.message


def test_chat_text_parts_render_as_offline(server, offline_llm) -> None:
    offline = offline_llm.chat(TWO_PARTS, SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt_token_ids
    tokenized = requests.post(f"{server.base_url}/tokenize", json={"messages": TWO_PARTS}, timeout=30).json()
    assert tokenized["tokens"] == offline
    text = offline_llm.get_tokenizer().decode(offline)
    assert "first part\nsecond part" in text   # joined by a newline, as vLLM does
    chat = requests.post(f"{server.base_url}/v1/chat/completions", timeout=60,
                         json={"messages": TWO_PARTS, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == len(offline)


def test_cache_salt(server) -> None:
    base = server.base_url
    empty = requests.post(f"{base}/v1/completions", json={"prompt": "hi", "cache_salt": ""}, timeout=30)
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "cache_salt"
    texts = []
    for salt in ("a", "b"):
        completion = requests.post(f"{base}/v1/completions", timeout=60, json={
            "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "cache_salt": salt})
        assert completion.status_code == 200, completion.text
        texts.append(completion.json()["choices"][0]["text"])
        by_ids = requests.post(f"{base}/v1/completions", timeout=60, json={
            "prompt": [1, 2, 3], "max_tokens": 2, "cache_salt": salt})
        assert by_ids.status_code == 200, by_ids.text
        chat = requests.post(f"{base}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "cache_salt": salt})
        assert chat.status_code == 200, chat.text
    assert texts[0] == texts[1]   # a salt changes cache hits, never the result


def _prefix_hits(base_url: str) -> float:
    return sum(value for (name, _), value in wait_idle(base_url).items()
               if name.startswith("pagedserve:prefix_cache_hits"))


def test_cache_salt_reaches_the_prefix_cache(server) -> None:
    """The same prompt hits the prefix cache under the same salt, never under another."""
    base = server.base_url
    prompt = "Salted prefix caching: " + " ".join(f"word{i}" for i in range(40))

    def run(salt: str) -> float:
        response = requests.post(f"{base}/v1/completions", timeout=60, json={
            "prompt": prompt, "max_tokens": 1, "cache_salt": salt})
        assert response.status_code == 200, response.text
        return _prefix_hits(base)

    before = _prefix_hits(base)
    first = run("salt-one")
    assert first == before
    again = run("salt-one")
    assert again >= first + 32   # at least two full blocks of 16 tokens
    assert run("salt-two") == again


def test_tokenize_errors_in_the_shape_of_the_body(server) -> None:
    url = f"{server.base_url}/tokenize"
    empty = requests.post(url, json={"inputs": ""}, timeout=10)
    assert empty.status_code == 422 and empty.json() == {"error": "`inputs` cannot be empty",
                                                         "error_type": "validation"}
    mixed = requests.post(url, json={"inputs": "x", "return_token_strs": True}, timeout=10)
    assert mixed.status_code == 422 and "return_token_strs" in mixed.json()["error"]
    vllm = requests.post(url, json={"prompt": "x", "parameters": {}}, timeout=10)
    assert vllm.status_code == 400 and vllm.json()["error"]["param"] == "parameters"


def test_chat_template_kwargs_and_documents_reach_the_template(server) -> None:
    """vLLM's chat_template_kwargs and documents: a request's own template sees them (/tokenize's ids
    are those of the text it should render); with the model's template a chat completion counts the
    prompt /tokenize renders from the same fields; a reserved key is a 400 naming the field."""
    template = ("{% for d in documents %}<doc>{{ d.text }}</doc>{% endfor %}"
                "{% for m in messages %}{{ m.content }}{% endfor %}{% if enable_thinking %}<think>{% endif %}")
    messages = [{"role": "user", "content": "Hi"}]
    extra = {"documents": [{"text": "Paris is in France."}], "chat_template_kwargs": {"enable_thinking": True}}

    def tokenize(**body) -> list[int]:
        response = requests.post(f"{server.base_url}/tokenize", json=body, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["tokens"]

    expected = tokenize(prompt="<doc>Paris is in France.</doc>Hi<think>", add_special_tokens=False)
    assert tokenize(messages=messages, chat_template=template, **extra) == expected
    assert tokenize(messages=messages, chat_template=template) == tokenize(prompt="Hi", add_special_tokens=False)
    url = f"{server.base_url}/v1/chat/completions"
    body = {"messages": messages, "max_tokens": 2, "temperature": 0, **extra}
    response = requests.post(url, json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len(tokenize(messages=messages, **extra))
    bad = requests.post(url, json={**body, "chat_template_kwargs": {"tools": []}}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs", bad.text


def test_allowed_token_ids(server) -> None:
    """vLLM's allowed_token_ids: sampled and greedy choices stay in the set; an id past the
    vocabulary, an empty list or a structured-outputs constraint beside it is a 400 naming the field."""
    url = f"{server.base_url}/v1/completions"
    allowed = [11, 12, 13, 14]
    for temperature in (0.0, 1.0):
        response = requests.post(url, json={"prompt": "Hello", "max_tokens": 6, "ignore_eos": True, "n": 2,
                                            "temperature": temperature, "seed": 1, "allowed_token_ids": allowed,
                                            "return_token_ids": True}, timeout=60)
        assert response.status_code == 200, response.text
        for choice in response.json()["choices"]:
            assert len(choice["token_ids"]) == 6 and set(choice["token_ids"]) <= set(allowed), choice
    for bad in ({"allowed_token_ids": [10**7]}, {"allowed_token_ids": []},
                # with a grammar the two masks may leave nothing to sample (it failed the request before)
                {"allowed_token_ids": [2], "guided_regex": "[0-9]+"}):
        response = requests.post(url, json={"prompt": "Hello", "max_tokens": 2, **bad}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == "allowed_token_ids", response.text


def test_body_size_limit_in_the_route_family_body(server) -> None:
    big = json.dumps({"inputs": "a" * (17 * 2**20)}).encode()
    response = requests.post(f"{server.base_url}/generate", data=big, timeout=30)
    assert response.status_code == 413 and response.json()["error_type"] == "validation"


def test_one_auth_middleware(auth_server) -> None:
    base = auth_server.base_url
    key = {"Authorization": f"Bearer {API_KEY}"}
    for route, body in (("/tokenize", {"prompt": "hi"}), ("/tokenize", {"inputs": "hi"}),
                        ("/detokenize", {"tokens": [1]})):
        denied = requests.post(base + route, json=body, timeout=10)
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "AuthenticationError"
        assert requests.post(base + route, json=body, headers=key, timeout=10).status_code == 200
    for route in ("/generate", "/generate_stream", "/"):
        denied = requests.post(base + route, json={"inputs": "hi"}, timeout=10)
        assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
        assert denied.json() == {"error": "missing or invalid API key: send `Authorization: Bearer <key>`",
                                 "error_type": "authentication"}
    for route in ("/health", "/metrics", "/version", "/info"):
        assert requests.get(base + route, timeout=10).status_code == 200, route
