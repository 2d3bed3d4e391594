"""POST /v1/responses (OpenAI's Responses API) through the shared server process with OpenAI's own
client: the text equals the chat route's for the same messages (instructions as the system
message), whole and streamed (the SDK's typed events, in order, sequence numbers counting up);
max_output_tokens makes the response incomplete; json_schema constrains it; what is refused is a
400 naming the field; function tools come back as function_call items."""
from __future__ import annotations

import json

import requests
from openai import OpenAI

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "Name a fruit."


def _chat_text(server, max_tokens: int, system: str | None = None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": QUESTION}]
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    return requests.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60).json()[
        "choices"][0]["message"]["content"]


def test_responses_equal_chat_whole_and_streamed(server) -> None:
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none")
    response = client.responses.create(model=MODEL, input=QUESTION, instructions="Answer in one word.",
                                       max_output_tokens=12, temperature=0)
    want = _chat_text(server, 12, "Answer in one word.")
    assert response.output_text == want and response.object == "response"
    assert response.usage.output_tokens > 0 and response.usage.total_tokens > response.usage.output_tokens
    assert response.status in ("completed", "incomplete")
    events = list(client.responses.create(model=MODEL, input=[{"role": "user", "content": QUESTION}],
                                          max_output_tokens=3, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == _chat_text(server, 3) == events[-4].text
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_json_schema_and_refusals(server) -> None:
    schema = {"type": "object", "properties": {"fruit": {"type": "string", "maxLength": 12}}, "required": ["fruit"]}
    body = {"model": MODEL, "input": QUESTION, "max_output_tokens": 40, "temperature": 0,
            "text": {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}}}
    reply = requests.post(f"{server.base_url}/v1/responses", json=body, timeout=60).json()
    assert "fruit" in json.loads(reply["output"][0]["content"][0]["text"])
    for bad, param in (({"previous_response_id": "resp_1"}, "previous_response_id"),
                       ({"max_output_tokens": 0}, "max_output_tokens"), ({"input": []}, "input"),
                       ({"text": {"format": {"type": "xml"}}}, "text.format"), ({"made_up": 1}, "made_up")):
        response = requests.post(f"{server.base_url}/v1/responses", json={"model": MODEL, "input": QUESTION, **bad},
                                 timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (bad, response.text)


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                          "required": ["city"]}}


def test_function_tools_whole_streamed_and_fed_back(server) -> None:
    """tool_choice naming the function (the chat route's forced schema): a function_call item with
    valid JSON arguments, whole and streamed (the same item in both), then the call and its output
    fed back as input items render as a tool turn (the reply is a message)."""
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none")
    kwargs = dict(model=MODEL, input="What's the weather in Paris?", tools=[WEATHER], temperature=0,
                  tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40)
    response = client.responses.create(**kwargs)
    [call] = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)
    events = list(client.responses.create(**kwargs, stream=True))
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == call.arguments and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    follow = client.responses.create(model=MODEL, temperature=0, max_output_tokens=8, tools=[WEATHER], input=[
        {"role": "user", "content": "What's the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}], tool_choice="none")
    assert follow.output[0].type == "message" and follow.output_text
    bad = requests.post(f"{server.base_url}/v1/responses", timeout=60, json={
        "model": MODEL, "input": "x", "tools": [{"type": "web_search"}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools"
