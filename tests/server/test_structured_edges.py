"""Structured outputs at the HTTP edges (issue 20 parts 3, 5 and 6's edge side): each API's
fields translated to StructuredOutputsParams (pagedserve/server/structured.py), then real
requests through the `openai` client and huggingface_hub's InferenceClient on the default
model, and invalid constraints answered 400/422 naming the request's own field."""
from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest
import requests

from pagedserve.errors import ValidationError
from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.server import structured
from pagedserve.server.openai_protocol import ChatCompletionRequest, CompletionRequest
from tests.server.conftest import serving

MODEL = "SmolLM2-135M-Instruct"
SCHEMA = {"type": "object",
          "properties": {"answer": {"enum": ["yes", "no"]},
                         "inner": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                                   "additionalProperties": False},
                         "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 2}},
          "required": ["answer", "inner", "tags"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Is the sky blue? Answer in JSON."}]


# --- the translation, without a server -------------------------------------------------------

def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=MESSAGES, **fields)


@pytest.mark.parametrize("fields, expected, field", [
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True), "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     StructuredOutputsParams(json=SCHEMA), "response_format.json_schema.schema"),
    ({"response_format": {"type": "json", "value": SCHEMA}}, StructuredOutputsParams(json=SCHEMA), "response_format"),
    ({"response_format": {"type": "regex", "value": "[ab]+"}}, StructuredOutputsParams(regex="[ab]+"),
     "response_format"),
    ({"structured_outputs": {"choice": ["a", "b"]}}, StructuredOutputsParams(choice=["a", "b"]),
     "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": 'root ::= "x"', "disable_fallback": False}},
     StructuredOutputsParams(grammar='root ::= "x"'), "structured_outputs.grammar"),
    ({"guided_json": json.dumps(SCHEMA)}, StructuredOutputsParams(json=SCHEMA), "guided_json"),
    ({"guided_regex": "a+", "guided_decoding_backend": "xgrammar"}, StructuredOutputsParams(regex="a+"),
     "guided_regex"),
    ({"guided_choice": ["x", "y"]}, StructuredOutputsParams(choice=["x", "y"]), "guided_choice"),
    ({"guided_grammar": 'root ::= "x"'}, StructuredOutputsParams(grammar='root ::= "x"'), "guided_grammar"),
])
def test_openai_fields_translate(fields, expected, field) -> None:
    request = _chat(**fields)
    request.check_supported()
    constraint = request.structured_constraint()
    assert constraint.params == expected and constraint.field == field
    assert request.to_sampling_params().structured_outputs == expected
    completion = CompletionRequest(prompt="hi", **fields)
    assert completion.to_sampling_params().structured_outputs == expected


def test_no_constraint_is_none() -> None:
    for request in (_chat(), _chat(response_format={"type": "text"})):
        request.check_supported()
        assert request.structured_constraint() is None and request.to_sampling_params().structured_outputs is None


@pytest.mark.parametrize("fields, param", [
    ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"guided_json": SCHEMA, "structured_outputs": {"regex": "a"}}, "guided_json"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"made_up": 1}}, "structured_outputs.made_up"),
    ({"structured_outputs": {"disable_any_whitespace": True, "regex": "a"}}, "structured_outputs.disable_any_whitespace"),
    ({"structured_outputs": "a+"}, "structured_outputs"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{no"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json", "value": 3}}, "response_format"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": "null"}, "guided_json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "null"}}},
     "response_format.json_schema.schema"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
])
def test_bad_openai_fields_name_the_field(fields, param) -> None:
    with pytest.raises(ValidationError) as info:
        _chat(**fields).check_supported()
    assert info.value.param == param and param.split(".")[0] in info.value.message


@pytest.mark.parametrize("grammar, expected", [
    ({"type": "json", "value": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
    ({"type": "json", "value": json.dumps(SCHEMA)}, StructuredOutputsParams(json=SCHEMA)),
    ({"type": "json_object", "value": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
    ({"type": "json_schema", "value": {"name": "x", "schema": SCHEMA}}, StructuredOutputsParams(json=SCHEMA)),
    ({"type": "regex", "value": "[0-9]+"}, StructuredOutputsParams(regex="[0-9]+")),
])
def test_tgi_grammar_translates(grammar, expected) -> None:
    assert structured.from_tgi_grammar(grammar).params == expected


@pytest.mark.parametrize("grammar", [{"type": "json"}, {"type": "json", "value": [1]}, {"type": "json", "value": "{x"},
                                     {"type": "json", "value": "null"},
                                     {"type": "regex", "value": 3}, {"type": "ebnf", "value": "x"}, "a+",
                                     {"type": "regex", "value": "a", "extra": 1}])
def test_bad_tgi_grammar_names_parameters_grammar(grammar) -> None:
    with pytest.raises(ValidationError) as info:
        structured.from_tgi_grammar(grammar)
    assert info.value.message.startswith("parameters.grammar")


def test_engine_compile_errors_are_renamed() -> None:
    constraint = structured.from_tgi_grammar({"type": "regex", "value": "("})
    with pytest.raises(ValidationError) as info, structured.naming(constraint):
        raise ValidationError("regex does not compile: unbalanced (", "regex")
    assert info.value.param == "parameters.grammar" and "unbalanced" in info.value.message
    with pytest.raises(ValidationError) as info, structured.naming(constraint):
        raise ValidationError("prompt too long", "prompt")   # not the constraint's: unchanged
    assert info.value.param == "prompt"
    constraint = structured.from_openai(_chat(guided_json={"type": "object"}))
    with pytest.raises(ValidationError) as info, structured.naming(constraint):
        raise ValidationError("structured_outputs.json: invalid JSON schema: bad", "json")
    assert (info.value.param, info.value.message) == ("guided_json", "guided_json: invalid JSON schema: bad")


# --- through a real server --------------------------------------------------------------------

@pytest.fixture(scope="module")
def structured_server(tmp_path_factory):
    yield from serving(tmp_path_factory, "structured_server")


@pytest.fixture(scope="module")
def client(structured_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{structured_server.base_url}/v1", api_key="unused", timeout=120, max_retries=0)


class Verdict(pydantic.BaseModel):
    answer: Literal["yes", "no"]
    sure: bool


def test_openai_parse_returns_a_parsed_object(client) -> None:
    completion = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Verdict,
                                               max_tokens=40, temperature=0)
    message = completion.choices[0].message
    assert isinstance(message.parsed, Verdict), message.content
    assert Verdict.model_validate_json(message.content) == message.parsed


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_on_both_openai_routes(client, temperature) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=fmt, max_tokens=60,
                                          temperature=temperature, seed=3)
    jsonschema.validate(json.loads(chat.choices[0].message.content), SCHEMA)
    text = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=60, temperature=temperature, seed=3,
                                     extra_body={"structured_outputs": {"json": SCHEMA}}).choices[0].text
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_regex_choice_grammar(client) -> None:
    messages = [{"role": "user", "content": 'Give a JSON object with key "color" for the sky.'}]
    choice = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                            response_format={"type": "json_object"}).choices[0]
    assert choice.finish_reason == "stop" and isinstance(json.loads(choice.message.content), dict)

    def complete(**extra) -> str:
        return client.completions.create(model=MODEL, prompt="The answer is", max_tokens=12, temperature=0,
                                         extra_body=extra).choices[0].text

    assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", complete(guided_regex=r"[0-9]{3}-[a-c]{2}"))
    assert complete(guided_choice=["Paris", "London"]) in ("Paris", "London")
    assert complete(structured_outputs={"choice": ["alpha", "beta"]}) in ("alpha", "beta")
    assert complete(guided_grammar='root ::= "yes" | "no"') in ("yes", "no")


def test_tgi_text_generation_with_grammar(structured_server) -> None:
    from huggingface_hub import InferenceClient
    tgi = InferenceClient(base_url=structured_server.base_url, timeout=120)
    text = tgi.text_generation("Is the sky blue? JSON:", grammar={"type": "json", "value": SCHEMA},
                               max_new_tokens=60)
    jsonschema.validate(json.loads(text), SCHEMA)
    streamed = "".join(tgi.text_generation("Code:", grammar={"type": "regex", "value": "[A-Z]{4}"},
                                           max_new_tokens=8, stream=True))
    assert re.fullmatch("[A-Z]{4}", streamed)
    # TGI's chat shape of response_format on the shared chat route
    response = requests.post(f"{structured_server.base_url}/v1/chat/completions", timeout=120, json={
        "messages": MESSAGES, "max_tokens": 60, "response_format": {"type": "json", "value": SCHEMA}})
    assert response.status_code == 200, response.text
    jsonschema.validate(json.loads(response.json()["choices"][0]["message"]["content"]), SCHEMA)


@contextmanager
def a_good_request_beside(base: str) -> Iterator[None]:
    """A constrained completion running meanwhile, which must answer 200 and match."""
    good: list[requests.Response] = []
    runner = threading.Thread(target=lambda: good.append(requests.post(f"{base}/v1/completions", timeout=120, json={
        "prompt": "Count:", "max_tokens": 16, "temperature": 0, "guided_regex": "[0-9 ]+"})))
    runner.start()
    try:
        yield
    finally:
        runner.join(timeout=120)
    assert good and good[0].status_code == 200 and re.fullmatch("[0-9 ]+", good[0].json()["choices"][0]["text"])


def _tgi_grammar_is_422(base: str, regex: str) -> None:
    tgi = requests.post(f"{base}/generate", timeout=60, json={
        "inputs": "x", "parameters": {"max_new_tokens": 4, "grammar": {"type": "regex", "value": regex}}})
    assert tgi.status_code == 422 and tgi.json()["error_type"] == "validation"
    assert tgi.json()["error"].startswith("parameters.grammar")


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"prompt": "x", "guided_regex": "("}, "guided_regex"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"grammar": "root ::= foo"}}, "structured_outputs.grammar"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"messages": MESSAGES, "guided_json": {"type": "object", "properties": 3}}, "guided_json"),
    ("/v1/chat/completions", {"messages": MESSAGES, "guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
    # a JSON text of null: once no constraint at all, and a request that never answered
    ("/v1/chat/completions", {"messages": MESSAGES, "guided_json": "null"}, "guided_json"),
    # languages with no string in them: compiled fine, but no token could ever be sampled
    ("/v1/completions", {"prompt": "x", "guided_grammar": "root ::= root"}, "guided_grammar"),
    ("/v1/completions", {"prompt": "x", "guided_grammar": "root ::= a\na ::= root"}, "guided_grammar"),
    ("/v1/chat/completions", {"messages": MESSAGES, "guided_regex": "[^\\s\\S]"}, "guided_regex"),
])
def test_invalid_constraints_are_4xx_while_others_run(structured_server, route, body, param) -> None:
    base = structured_server.base_url
    with a_good_request_beside(base):
        response = requests.post(base + route, json={"max_tokens": 4, **body}, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and param in error["message"]
        _tgi_grammar_is_422(base, "(")


def test_a_grammar_with_no_way_on_is_a_4xx_naming_the_field(structured_server) -> None:
    """The regex a[^\\s\\S] compiles and starts ("a"), then admits nothing: found only while
    generating, it is still the request's own error (400 / an error event with code 400 /
    TGI's 422), naming the request's field, while a good request beside it answers."""
    base = structured_server.base_url
    with a_good_request_beside(base):
        body = {"prompt": "Say a:", "max_tokens": 4, "guided_regex": "a[^\\s\\S]"}
        response = requests.post(f"{base}/v1/completions", json=body, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "guided_regex" and "no token can continue the output" in error["message"]
        streamed = requests.post(f"{base}/v1/chat/completions", timeout=60, stream=True, json={
            "messages": MESSAGES, "max_tokens": 4, "stream": True,
            "response_format": {"type": "regex", "value": "a[^\\s\\S]"}})
        events = [line for line in streamed.iter_lines() if line.startswith(b"data: {")]
        last = json.loads(events[-1][len(b"data: "):])
        assert last["error"]["code"] == 400 and last["error"]["param"] == "response_format"
        _tgi_grammar_is_422(base, "a[^\\s\\S]")
