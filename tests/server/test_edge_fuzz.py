"""The HTTP edge under seeded fuzz (issue 16): random mixes of odd values on every route get
200 or a 4xx naming a field, never a 5xx; random mixes of valid fields answer 200 without an
error; good streams beside them finish with the text they get alone. On the `edge` server
(conftest)."""
from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.server.conftest import GoodTraffic, post


# ---- every route, random mixes of bad fields: a 4xx naming one, never a 5xx --------------

ODD_VALUES = [None, -1, 0, 7, -2**63 - 1, 2**64, 10**30, 1e308, -1e308, 0.5, -0.5, "", "x" * 3000, "\u0000",
              "\ud800", "<|im_start|>", "{", [], [-1], [2**40], [""], [[1, 2]], [None], [{}], {}, {"a": 1},
              {"1": 1e308}, {"-1": 5}, {"abc": 1}, {"5": None}, True, float("nan"), float("inf"),
              {"type": "json_object"}, {"type": "json_schema", "json_schema": {}},
              {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectt"}}},
              {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}},
              {"type": "string", "pattern": "(("}, [0] * 2000, "null", "[1]"]   # (JSON texts: guided_json's)
LENGTHS = [None, 0, 2, -1, 2**31, 1.5, "3", True]   # bounded: a case never generates more than 2 tokens
OPENAI_FIELDS = ["model", "temperature", "top_p", "top_k", "min_p", "n", "best_of", "stop", "stop_token_ids", "seed",
                 "logit_bias", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
                 "prompt_logprobs", "stream", "stream_options", "truncate_prompt_tokens", "allowed_token_ids",
                 "guided_json", "guided_regex", "guided_choice", "guided_grammar", "response_format",
                 "include_stop_str_in_output", "skip_special_tokens", "return_token_ids", "request_id", "cache_salt",
                 "structured_outputs", "priority", "use_beam_search", "vllm_xargs", "user"]
ROUTE_FIELDS = {
    "/v1/completions": ({"prompt": "Hi", "max_tokens": 2, "ignore_eos": True}, "max_tokens",
                        OPENAI_FIELDS + ["prompt", "logprobs", "echo", "suffix", "add_special_tokens"]),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "ignore_eos": True},
                             "max_completion_tokens",
                             OPENAI_FIELDS + ["messages", "logprobs", "top_logprobs", "tools", "tool_choice",
                                              "parallel_tool_calls", "chat_template", "chat_template_kwargs",
                                              "add_generation_prompt", "continue_final_message", "echo", "documents",
                                              "metadata", "modalities", "functions", "function_call"]),
    "/v1/responses": ({"input": "Hi", "max_output_tokens": 2}, "max_output_tokens",
                      ["model", "input", "instructions", "temperature", "top_p", "seed", "stream", "store", "metadata",
                       "user", "text", "tool_choice", "tools", "parallel_tool_calls", "truncation", "service_tier",
                       "previous_response_id", "background", "include", "request_id", "priority"]),
    "/tokenize": ({"prompt": "Hi"}, None, ["prompt", "messages", "add_special_tokens", "add_generation_prompt",
                                           "return_token_strs", "tools", "model"]),
    "/detokenize": ({"tokens": [1, 2]}, None, ["tokens", "model"]),
}
TGI_PARAMETERS = ["temperature", "top_p", "top_k", "typical_p", "repetition_penalty", "frequency_penalty", "seed",
                  "stop", "do_sample", "details", "decoder_input_details", "return_full_text", "truncate",
                  "watermark", "best_of", "top_n_tokens", "grammar", "adapter_id"]


def _odd_body(rng: random.Random) -> tuple[str, dict]:
    """A valid body of a random route with one to three fields set to odd values."""
    path = rng.choice([*ROUTE_FIELDS, "/generate", "/generate_stream", "/"])
    if path in ROUTE_FIELDS:
        base, length_field, fields = ROUTE_FIELDS[path]
        body = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 3)):
            if length_field is not None and rng.random() < 0.15:
                body["max_tokens" if rng.random() < 0.5 else length_field] = rng.choice(LENGTHS)
            else:
                body[rng.choice(fields)] = rng.choice(ODD_VALUES)
        if body.get("max_tokens", 2) is None and body.get("max_completion_tokens") is None:
            body["max_completion_tokens" if path.startswith("/v1/chat") else "max_tokens"] = 2
        if path == "/v1/responses" and body.get("max_output_tokens") is None:
            body["max_output_tokens"] = 2   # bounded: a case never generates more than 2 tokens
        return path, body
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.1:
            body["inputs"] = rng.choice(ODD_VALUES)
        elif roll < 0.15:
            body["parameters"]["max_new_tokens"] = rng.choice(LENGTHS[1:])
        else:
            body["parameters"][rng.choice(TGI_PARAMETERS)] = rng.choice(ODD_VALUES)
    return path, body


def _carries_error(path: str, text: str) -> bool:
    """Whether a 200's body (JSON, or an event stream's `data:` objects) holds an `error` member: a
    Response object carries "error": null, and its stream's errors are `error` events. (Not a
    substring test: a sampled token's text may be "error".)"""
    if path == "/v1/responses":
        return "event: error" in text
    if text.lstrip().startswith(("data:", "event:")):
        objects = [json.loads(line[5:]) for line in text.splitlines()
                   if line.startswith("data:") and line[5:].strip() != "[DONE]"]
    else:
        objects = json.loads(text)
        objects = objects if isinstance(objects, list) else [objects]
    return any(isinstance(obj, dict) and "error" in obj for obj in objects)


def _assert_clear_answer(path: str, body: dict, response: requests.Response) -> None:
    case = (path, json.dumps(body, default=str)[:300], response.status_code, response.text[:300])
    assert response.status_code in (200, 400, 404, 422), case
    if response.status_code == 200:   # an accepted body streams no error either
        assert not _carries_error(path, response.text), case
    elif path in ROUTE_FIELDS:
        error = response.json()["error"]
        assert error["param"] and error["code"] == response.status_code, case
    else:
        error = response.json()["error"]
        assert response.status_code == 422 and response.json()["error_type"] == "validation", case
        assert any(name in error for name in ("inputs", "parameters", *TGI_PARAMETERS, "max_new_tokens")), case


def test_random_odd_bodies_get_a_4xx_naming_a_field_never_a_5xx(edge, reference_text) -> None:
    """400 seeded bodies across the OpenAI and TGI routes, each valid but for one to three
    fields set to odd values (wrong types, out-of-range numbers, NaN, lone surrogates, broken
    schemas...), sent from two threads while good streams run: each gets 200 or a 4xx whose
    body names a field, and the good streams finish with the text they get alone."""
    rng = random.Random(16)
    cases = [_odd_body(rng) for _ in range(400)]

    def send(case: tuple[str, dict]) -> requests.Response:
        path, body = case
        return post(edge, path, data=json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass"))

    with GoodTraffic(edge.base_url, count=4) as good, ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(send, cases))
    good.check(reference_text)
    for (path, body), response in zip(cases, answers):
        _assert_clear_answer(path, body, response)
    statuses = {response.status_code for response in answers}
    assert {200, 400, 422} <= statuses   # the mix reaches the engine as well as both validators


# ---- every route, random mixes of valid fields: 200 with no error, or a 4xx naming one -------

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
VALID_OPENAI = {
    "n": [1, 2, 3], "best_of": [3, 4], "temperature": [0, 0.7, 1.5], "top_p": [0.5, 1.0], "top_k": [-1, 1, 50],
    "min_p": [0, 0.1], "seed": [1, 123], "stop": ["\n", [".", "!"], ["the"]], "stream": [False, True],
    "stream_options": [{"include_usage": True}], "presence_penalty": [0.5, -1.0], "frequency_penalty": [1.0],
    "repetition_penalty": [1.3], "logit_bias": [{"1": 5}, {"100": -100, "200": 100}], "min_tokens": [0, 2],
    "ignore_eos": [False, True], "stop_token_ids": [[2], [1, 2]], "include_stop_str_in_output": [True],
    "use_beam_search": [True],
    "prompt_logprobs": [0, 2], "skip_special_tokens": [False], "guided_choice": [["yes", "no"]],
    "guided_regex": ["[0-9]{3}", "a"], "response_format": [{"type": "json_object"}, {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]}
VALID_ROUTE = {
    "/v1/completions": ({"prompt": ["Hi", "Bye"]}, {"logprobs": [0, 1, 5], "echo": [True],
                                                   "prompt": ["Hello", [1, 2, 3], [[5, 6], [7]]]}),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "What's the weather in Paris?"}]},
                             {"logprobs": [True], "top_logprobs": [0, 3], "tools": [[TOOL]],
                              "tool_choice": ["none", "required", {"type": "function",
                                                                   "function": {"name": "get_weather"}}]}),
}
VALID_TGI = {"temperature": [0.5, 1.0], "top_k": [5], "top_p": [0.9], "do_sample": [False, True], "seed": [3],
             "stop": [["\n"]], "details": [True], "decoder_input_details": [True], "return_full_text": [True],
             "best_of": [2], "top_n_tokens": [2], "repetition_penalty": [1.2], "typical_p": [0.5], "truncate": [3],
             "grammar": [{"type": "json", "value": {"type": "object"}}, {"type": "regex", "value": "[a-z]+"}]}


BEAM_REFUSED = ("stop", "stop_token_ids", "min_tokens", "logit_bias", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "prompt_logprobs", "best_of", "guided_choice", "guided_regex", "response_format")


def _valid_body(rng: random.Random) -> tuple[str, dict]:
    """A random route's body with two to six fields set to valid values (at most 4 tokens a
    sequence)."""
    path = rng.choice([*VALID_ROUTE, "/generate", "/generate_stream"])
    if path in VALID_ROUTE:
        body, extra = VALID_ROUTE[path]
        body, options = json.loads(json.dumps(body)), {**VALID_OPENAI, **extra}
        for field in rng.sample(sorted(options), rng.randint(2, 6)):
            body[field] = rng.choice(options[field])
        body["max_tokens"] = rng.choice([1, 4])
        # the combinations the API refuses, left out: stream_options without a stream, top_logprobs
        # without logprobs, two constraints, tools with the server's default "auto", min_tokens >
        # max_tokens, best_of in a stream
        if "stream_options" in body:
            body["stream"] = True
        if "top_logprobs" in body:
            body["logprobs"] = True
        constraints = []
        if path.startswith("/v1/chat") and ("tools" in body or "tool_choice" in body):
            body["tools"] = [TOOL]
            body.setdefault("tool_choice", "none")
            constraints += ["tool_choice"] if body["tool_choice"] != "none" else []
        constraints += [field for field in ("guided_choice", "guided_regex", "response_format") if field in body]
        for field in constraints[1:]:
            del body[field]
        if body.get("min_tokens"):
            body["max_tokens"] = 4
        if body.get("stream"):   # best_of > n is not streamed
            body.pop("best_of", None)
        if body.get("use_beam_search"):   # n beams: what a beam search does not apply is refused
            for field in BEAM_REFUSED:
                body.pop(field, None)
            if body.get("tool_choice") not in (None, "none"):
                body["tool_choice"] = "none"
            body["length_penalty"] = rng.choice([0.5, 1.0, 2.0])
        return path, body
    parameters = {"max_new_tokens": rng.choice([1, 4])}
    for field in rng.sample(sorted(VALID_TGI), rng.randint(2, 6)):
        parameters[field] = rng.choice(VALID_TGI[field])
    if "best_of" in parameters:   # TGI: sampling only, unseeded, no stream
        parameters["do_sample"] = True
        parameters.pop("seed", None)
    if path == "/generate_stream":
        parameters.pop("best_of", None)
        parameters.pop("decoder_input_details", None)
    return path, {"inputs": rng.choice(["Hello", "The capital of France is"]), "parameters": parameters}


def test_random_valid_mixes_answer_200_without_errors(edge, reference_text) -> None:
    """120 seeded bodies mixing valid fields (grammars with logprobs, n / best_of, echo,
    prompt_logprobs, tools, streams, beam search...) from two threads while good streams run: each is a 200
    carrying no error (a stream ends with [DONE]); the combinations the APIs refuse are left out
    of the mix, so a 4xx (which must name a field) is the exception. (TGI's top_n_tokens under a grammar answered 500 before: a
    masked token's -inf logprob is not JSON.)"""
    rng = random.Random(36)
    cases = [_valid_body(rng) for _ in range(120)]
    with GoodTraffic(edge.base_url, count=3) as good, ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda case: post(edge, *case), cases))
    good.check(reference_text)
    for (path, body), response in zip(cases, answers):
        _assert_clear_answer(path, body, response)
        if response.status_code == 200 and path.startswith("/v1") and body.get("stream"):
            assert response.text.rstrip().endswith("data: [DONE]"), (path, body, response.text[-300:])
    assert sum(response.status_code == 200 for response in answers) >= 0.95 * len(cases)
