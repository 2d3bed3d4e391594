"""--reasoning-parser through a real server process on the default model, with OpenAI's client: a
structured-outputs regex makes the model write `<think>...</think>answer` exactly; the reply's
`reasoning` (and `reasoning_content`) holds the thought and `content` the answer, whole and
streamed, with no part of a tag in any delta."""
from __future__ import annotations

import json
from typing import Iterator

import pytest
import requests
from openai import OpenAI

from tests.server.conftest import ServerProcess, serving

THOUGHT, ANSWER = "France's capital: Paris.", "Paris"
BODY = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 40,
        "temperature": 0, "structured_outputs": {"regex": "<think>France's capital: Paris\\.</think>Paris"}}


@pytest.fixture(scope="module")
def reasoning_server(tmp_path_factory) -> Iterator[ServerProcess]:
    yield from serving(tmp_path_factory, "reasoning_server", "--reasoning-parser", "deepseek_r1",
                       "--max-model-len", "512", "--num-kv-blocks", "64")


def test_reasoning_apart_whole_and_streamed(reasoning_server) -> None:
    client = OpenAI(base_url=f"{reasoning_server.base_url}/v1", api_key="none")
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=BODY["messages"], max_tokens=40,
                                           temperature=0, extra_body={"structured_outputs": BODY["structured_outputs"]})
    message = reply.choices[0].message
    assert message.content == ANSWER and message.model_extra["reasoning"] == THOUGHT
    assert message.model_extra["reasoning_content"] == THOUGHT and reply.choices[0].finish_reason == "stop"
    deltas = []
    with requests.post(f"{reasoning_server.base_url}/v1/chat/completions", json={**BODY, "stream": True},
                       stream=True, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                deltas += [c["delta"] for c in json.loads(line[6:])["choices"]]
    reasoning = "".join(d.get("reasoning") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert (reasoning, content) == (THOUGHT, ANSWER)
    assert not any("think>" in (d.get("content") or "") + (d.get("reasoning") or "") for d in deltas)
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)


def test_an_unclosed_thought_is_all_reasoning(reasoning_server) -> None:
    """deepseek_r1: without a </think> the output so far is reasoning and content is null."""
    body = {**BODY, "max_tokens": 6, "structured_outputs": {"regex": "<think>[a-z ]{20}</think>Paris"}}
    message = requests.post(f"{reasoning_server.base_url}/v1/chat/completions", json=body, timeout=60).json()[
        "choices"][0]["message"]
    assert message["content"] is None and message["reasoning"] and "<think>" not in message["reasoning"]


def test_responses_api_reasoning_items(reasoning_server) -> None:
    """/v1/responses under the parser: the thought as a reasoning item first, the answer as the
    message, whole and streamed alike. A JSON-string schema makes the output `"abc</think>Paris"`,
    so deepseek_r1 reads `"abc` as reasoning and `Paris"` as the answer."""
    schema = {"type": "string", "enum": ["abc</think>Paris"]}
    body = {"model": "SmolLM2-135M-Instruct", "input": "Capital of France?", "max_output_tokens": 20,
            "temperature": 0, "text": {"format": {"type": "json_schema", "name": "a", "schema": schema}}}
    whole = requests.post(f"{reasoning_server.base_url}/v1/responses", json=body, timeout=60).json()
    assert [item["type"] for item in whole["output"]] == ["reasoning", "message"]
    assert whole["output"][0]["content"][0]["text"] == '"abc' and whole["output"][1]["content"][0]["text"] == 'Paris"'
    events = []
    with requests.post(f"{reasoning_server.base_url}/v1/responses", json={**body, "stream": True}, stream=True,
                       timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
    thought = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    answer = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert (thought, answer) == ('"abc', 'Paris"')
    added = [(e["output_index"], e["item"]["type"]) for e in events if e["type"] == "response.output_item.added"]
    assert added == [(0, "reasoning"), (1, "message")] and events[-1]["type"] == "response.completed"
    assert [i["type"] for i in events[-1]["response"]["output"]] == ["reasoning", "message"]
