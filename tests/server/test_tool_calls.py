"""Tool calling through a real server (issue 20, part 4; tools on TGI's chat route, part 5):
the official openai client and huggingface_hub's InferenceClient with tools; tool_choice
"required" and a named function give tool_calls whose arguments validate against the tool's
schema, finish_reason "tool_calls", the same call assembled from stream deltas; a follow-up
turn with the tool's result; the 400s naming tool_choice / tools."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import requests

from tests.server.conftest import serving

MODEL = "SmolLM2-135M-Instruct"
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER_SCHEMA}},
         {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                           "parameters": {"type": "object", "properties": {}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
MAX_TOKENS = 60


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    yield from serving(tmp_path_factory, "tool_server", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                       "--max-model-len", "2048")


@pytest.fixture(scope="module")
def client(tool_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tool_server.base_url}/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def named(client):
    return client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED,
                                          max_tokens=MAX_TOKENS, temperature=0)


def _check_weather_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_SCHEMA)
    return arguments


def test_named_function_gives_a_valid_call(named) -> None:
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    _check_weather_call(choice.message.tool_calls[0])


def test_named_function_streamed_assembles_the_same_call(client, named) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED,
                                                 max_tokens=MAX_TOKENS, temperature=0, stream=True, logprobs=True,
                                                 stream_options={"include_usage": True}))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    # logprobs ride on the tool-call deltas: one entry per generated token, none lost
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == chunks[-1].usage.completion_tokens and all(e.logprob <= 0 for e in entries)
    first = deltas[0]
    assert first.index == 0 and first.id.startswith("chatcmpl-tool-") and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert all(d.index == 0 and d.id is None for d in deltas[1:]) and len(deltas) > 2   # arguments as they come
    arguments = "".join(d.function.arguments for d in deltas)
    assert json.loads(arguments) == json.loads(named.choices[0].message.tool_calls[0].function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_required_gives_calls_of_the_given_tools(client) -> None:
    for stream in (False, True):
        raw = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                             max_tokens=MAX_TOKENS, temperature=0, stream=stream)
        if stream:
            chunks = list(raw)
            deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
            names = [d.function.name for d in deltas if d.id is not None]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            message = raw.choices[0].message
            names, finish = [call.function.name for call in message.tool_calls], raw.choices[0].finish_reason
            assert message.content is None
            for call in message.tool_calls:
                if call.function.name == "get_weather":
                    _check_weather_call(call)
                else:
                    assert json.loads(call.function.arguments) == {}
        assert names and set(names) <= {"get_weather", "get_time"} and finish == "tool_calls"


def test_follow_up_turn_with_the_tool_result(client, named) -> None:
    call = named.choices[0].message.tool_calls[0]
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                            max_tokens=8, temperature=0)
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls in (None, [])
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_auto_parses_or_answers_plain_text(client) -> None:
    """tool_choice "auto" (the default with tools): whatever the small model says parses
    into calls of known shape or stays content; never an error."""
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=24, temperature=0)
    choice = response.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")
    # streamed: the same answer; plain text arrives as it is generated, not all at the end
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=24,
                                                 temperature=0, stream=True))
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    if choice.message.tool_calls:
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert [tc.function.name for tc in calls if tc.function.name] == [t.function.name for t in
                                                                         choice.message.tool_calls]
    else:
        assert "".join(contents) == choice.message.content and len(contents) > 3


def test_tgi_client_named_tool(tool_server) -> None:
    """TGI's chat route is the same route: huggingface_hub's spelling of tool_choice."""
    from huggingface_hub import InferenceClient
    hf = InferenceClient(base_url=tool_server.base_url, timeout=120)
    # no model: huggingface_hub then sends "dummy", TGI's placeholder, which the server accepts
    output = hf.chat_completion(messages=ASK, tools=TOOLS, tool_choice={"function": {"name": "get_weather"}},
                                max_tokens=MAX_TOKENS, temperature=0)
    call = output.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and output.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)


@pytest.mark.parametrize("extra, field", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_requests_are_400_naming_the_field(tool_server, extra, field) -> None:
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 4, **extra}
    response = requests.post(f"{tool_server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_auto_needs_the_server_flags(server) -> None:
    """The shared server has no --enable-auto-tool-choice: tools without tool_choice ("auto")
    are a 400 explaining it; "none" is served."""
    url = f"{server.base_url}/v1/chat/completions"
    response = requests.post(url, json={"messages": ASK, "tools": TOOLS, "max_tokens": 4}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in response.json()["error"]["message"]
    ok = requests.post(url, json={"messages": ASK, "tools": TOOLS, "tool_choice": "none", "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["tool_calls"] == []


def test_tools_reach_the_template_on_tokenize_and_with_a_request_template(tool_server, client) -> None:
    """A request's own chat_template sees `tools` (the default model's own template ignores
    them), and /tokenize renders tools as the chat route does: the same prompt tokens."""
    url = f"{tool_server.base_url}/tokenize"
    template = "{% for t in tools or [] %}<{{ t.function.name }}>{% endfor %}{{ messages[0].content }}"
    body = {"model": MODEL, "messages": ASK, "chat_template": template, "return_token_strs": True}
    plain = requests.post(url, json=body, timeout=60).json()
    with_tools = requests.post(url, json={**body, "tools": TOOLS}, timeout=60).json()
    assert "".join(with_tools["token_strs"]).startswith("<get_weather><get_time>What")
    assert "".join(plain["token_strs"]).startswith("What")
    chat = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1,
                                          temperature=0, extra_body={"chat_template": template})
    assert with_tools["count"] == chat.usage.prompt_tokens > plain["count"]
    bad = requests.post(url, json={**body, "tools": [{"type": "web"}]}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools"
