"""Every error of the issue over raw HTTP: status and the OpenAI error body."""
from __future__ import annotations

import http.client
import json

import pytest
import requests

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def _assert_error(response: requests.Response, status: int, param: str | None, error_type: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert error["param"] == param and error["type"] == error_type and error["code"] == status
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.mark.parametrize("route, body, param", [
    (COMPLETIONS, {"prompt": "hi", "temperature": -0.5}, "temperature"),
    (CHAT, {"messages": MESSAGES, "temperature": -1}, "temperature"),
    (COMPLETIONS, {"prompt": "hi", "n": 0}, "n"),
    (CHAT, {"messages": MESSAGES, "n": 0}, "n"),
    # an unknown model is a 404 (issue 16 #16): test_openai_behaviours.py::test_unknown_model_is_404_and_aliases_work
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 8192}, "max_tokens"),   # 1 prompt token + 8192 > max_model_len
    (CHAT, {"messages": MESSAGES, "max_completion_tokens": 100000}, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "suffix": "!"}, "suffix"),
    (COMPLETIONS, {"prompt": "hi", "use_beam_search": True, "stop": ["."]}, "stop"),   # not applied by beam search
    (CHAT, {"messages": MESSAGES, "priority": 1}, "priority"),   # needs --scheduling-policy priority (as vLLM)
    (COMPLETIONS, {"prompt": "hi", "made_up_field": 1}, "made_up_field"),
    # tools without tool_choice mean "auto", which needs --enable-auto-tool-choice (as vLLM)
    (CHAT, {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    (CHAT, {"messages": MESSAGES, "response_format": {"type": "json_object", "made_up": 1}}, "response_format"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0"),
    (COMPLETIONS, {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"prompt": [10**9]}, "prompt"),
    (COMPLETIONS, {"prompt": ""}, "prompt"),
    (COMPLETIONS, {}, "prompt"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
])
def test_invalid_fields_are_400(server, route: str, body: dict, param: str) -> None:
    response = requests.post(server.base_url + route, json=body, timeout=30)
    _assert_error(response, 400, param, "BadRequestError")


def test_invalid_json_is_400(server) -> None:
    response = requests.post(server.base_url + COMPLETIONS, data=b"{not json", timeout=10,
                             headers={"content-type": "application/json"})
    _assert_error(response, 400, None, "BadRequestError")


def test_unknown_route_is_404(server) -> None:
    _assert_error(requests.get(server.base_url + "/v1/engines", timeout=10), 404, None, "NotFoundError")
    _assert_error(requests.post(server.base_url + "/nope", json={}, timeout=10), 404, None, "NotFoundError")


def test_body_size_limit_is_413(server) -> None:
    big = json.dumps({"prompt": "a" * (17 * 2**20)}).encode()
    _assert_error(requests.post(server.base_url + COMPLETIONS, data=big, timeout=30), 413, None,
                  "RequestTooLargeError")

    def chunked():   # no Content-Length: the limit applies while reading
        yield b'{"prompt": "'
        for _ in range(17):
            yield b"a" * 2**20
        yield b'"}'
    _assert_error(requests.post(server.base_url + COMPLETIONS, data=chunked(), timeout=30), 413, None,
                  "RequestTooLargeError")
    # SageMaker's /invocations reads the body before it knows the route: under the same limit
    _assert_error(requests.post(server.base_url + "/invocations", data=chunked(), timeout=30), 413, None,
                  "RequestTooLargeError")


def test_streamed_request_errors_before_streaming(server) -> None:
    """Validation happens before the 200 and the first event."""
    response = requests.post(server.base_url + CHAT, json={"messages": MESSAGES, "stream": True, "n": 0},
                             timeout=10)
    _assert_error(response, 400, "n", "BadRequestError")


def test_health_ok(server) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/health")
    assert connection.getresponse().status == 200
