"""Structured outputs on the default model (SmolLM2-135M-Instruct) through the offline API:
32 prompts under a JSON schema (nested objects, arrays, enums, required fields) all parse and
validate, greedy and at temperature 1.0; regex, choice and EBNF outputs match."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pagedserve import LLM, SamplingParams, StructuredOutputsParams
from tests.helpers import TEST_DEVICE

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
}
SUBJECTS = ["a teacher", "a pilot", "a farmer", "a student", "a chef", "a doctor", "a painter", "a nurse"]
PROMPTS = [f"{verb} {subject} as a JSON user record:" for verb in ("Describe", "Write", "Invent", "Give")
           for subject in SUBJECTS]


@pytest.fixture(scope="module")
def llm():
    return LLM(device=TEST_DEVICE, dtype="float32", max_model_len=512)


def _chat_prompt(llm: LLM, text: str) -> str:
    return llm.get_tokenizer().apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_all_validate(llm, temperature):
    assert len(PROMPTS) == 32
    params = SamplingParams(max_tokens=128, temperature=temperature, seed=1234,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    outs = llm.generate([_chat_prompt(llm, p) for p in PROMPTS], params, use_tqdm=False)
    for out in outs:
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), SCHEMA)


def test_regex_choice_and_grammar_outputs_match(llm):
    regex = r"\d{3}-\d{3}-\d{4}"
    choices = ["Paris", "London", "Berlin", "Madrid"]
    grammar = ('root ::= "The answer is " answer "."\n'
               'answer ::= "yes" | "no" | [0-9] [0-9]?')
    prompts = [_chat_prompt(llm, "Give me a phone number."), _chat_prompt(llm, "What is the capital of France?"),
               _chat_prompt(llm, "Is water wet?"), _chat_prompt(llm, "Pick a city.")]
    params = [SamplingParams(max_tokens=32, temperature=0.0, structured_outputs=StructuredOutputsParams(regex=regex)),
              SamplingParams(max_tokens=16, temperature=0.0, structured_outputs=StructuredOutputsParams(choice=choices)),
              SamplingParams(max_tokens=32, temperature=0.0, structured_outputs=StructuredOutputsParams(grammar=grammar)),
              SamplingParams(max_tokens=16, temperature=1.0, seed=5, n=3,
                             structured_outputs=StructuredOutputsParams(choice=choices))]
    phone, capital, answer, cities = llm.generate(prompts, params, use_tqdm=False)
    assert re.fullmatch(regex, phone.outputs[0].text), phone.outputs[0].text
    assert capital.outputs[0].text in choices
    assert re.fullmatch(r"The answer is (yes|no|[0-9][0-9]?)\.", answer.outputs[0].text), answer.outputs[0].text
    assert all(c.text in choices and c.finish_reason == "stop" for c in cities.outputs)
    assert all(o.outputs[0].finish_reason == "stop" for o in (phone, capital, answer))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_grammar_that_can_only_end_wins_over_min_tokens(llm, temperature):
    """regex "a" with min_tokens 2: after "a" the grammar allows only EOS, which min_tokens masks;
    the grammar wins (the request failed in the engine, a 500 over HTTP, before). A grammar that
    can go on still honours min_tokens: "a+" ends after at least 2 tokens."""
    prompt = _chat_prompt(llm, "Say a.")
    complete, longer = llm.generate(
        [prompt, prompt],
        [SamplingParams(max_tokens=4, temperature=temperature, seed=3, min_tokens=2,
                        structured_outputs=StructuredOutputsParams(regex="a")),
         SamplingParams(max_tokens=4, temperature=temperature, seed=3, min_tokens=2,
                        structured_outputs=StructuredOutputsParams(regex="a+"))], use_tqdm=False)
    out = complete.outputs[0]
    assert (out.text, out.finish_reason, len(out.token_ids)) == ("a", "stop", 2)   # "a", then EOS
    out = longer.outputs[0]
    assert re.fullmatch("a+", out.text) and len(out.token_ids) >= 2, (out.text, out.token_ids)


@pytest.mark.parametrize("async_scheduling", [False, True])   # matchers on the engine thread / in the grammar process
def test_a_grammar_with_no_way_on_fails_as_the_requests_own_doing(async_scheduling):
    """The regex "a[^\\s\\S]" compiles and allows "a", then no token at all: the request fails
    with error_param "structured_outputs" (a 400 over HTTP, not an engine failure), beside a
    request that runs to its end."""
    llm = LLM(device=TEST_DEVICE, dtype="float32", max_model_len=256, async_scheduling=async_scheduling)
    try:
        tokenizer = llm.get_tokenizer()
        prompt = _chat_prompt(llm, "Say a.")
        a = tokenizer.encode("a", add_special_tokens=False)
        params = [SamplingParams(max_tokens=6, temperature=0.0, structured_outputs=StructuredOutputsParams(regex=r"a[^\s\S]")),
                  SamplingParams(max_tokens=6, temperature=0.0, structured_outputs=StructuredOutputsParams(regex="a+"))]
        dead, fine = llm.generate([prompt] * len(params), params, use_tqdm=False)
        assert dead.outputs[0].finish_reason == "abort" and dead.error_param == "structured_outputs"
        assert dead.outputs[0].token_ids[0] == a[0] and "no token can continue the output" in dead.error
        assert fine.error is None and re.fullmatch("a+", fine.outputs[0].text)
    finally:
        llm.shutdown()
