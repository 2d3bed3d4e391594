"""What a compatibility audit with a real server found, pinned through the float32 `server` with
real clients: `echo` with max_tokens 0 on /v1/completions (vLLM's echo without generation: the
prompt and its logprobs, nothing generated), /v1/responses errors naming the Responses request's
own fields, its `reasoning` and `top_logprobs` (+ include message.output_text.logprobs), TGI's
`details` only when asked for, vLLM's early_stopping / mm_processor_kwargs at their defaults,
and no asyncio noise in the log after a client leaves a beam search."""
from __future__ import annotations

import json
import time

import pytest
import requests
from openai import OpenAI

from tests.server.conftest import wait_idle

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "Hello world"]


def _post(server, path: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(f"{server.base_url}{path}", json=body, timeout=120, **kwargs)


def _ids(server, text: str) -> list[int]:
    return _post(server, "/tokenize", {"prompt": text}).json()["tokens"]


def test_echo_without_generation_returns_the_prompts_and_their_logprobs(server) -> None:
    """vLLM's echo_without_generation: each choice is its prompt, its logprobs the prompt's (those
    a one-token echo gives for the prompt positions), finish_reason "length"; as vLLM's, usage
    counts the one token the engine ran for each choice. Streamed: the same choices, one chunk
    each. max_tokens 0 without echo stays a 400."""
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)
    ids = [_ids(server, prompt) for prompt in PROMPTS]
    reference = [_post(server, "/v1/completions", {
        "prompt": prompt, "echo": True, "max_tokens": 1, "logprobs": 1, "temperature": 0,
        "return_tokens_as_token_ids": True}).json()["choices"][0]["logprobs"] for prompt in PROMPTS]
    body = {"prompt": PROMPTS, "echo": True, "max_tokens": 0, "logprobs": 1, "n": 2}
    whole = client.completions.create(model=MODEL, **body, extra_body={"return_tokens_as_token_ids": True})
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    for choice in whole.choices:
        prompt = choice.index // 2
        assert choice.text == PROMPTS[prompt] and choice.finish_reason == "length"
        assert choice.logprobs.tokens == [f"token_id:{i}" for i in ids[prompt]]   # the prompt's, nothing after
        assert choice.logprobs.token_logprobs[0] is None
        expected = reference[prompt]["token_logprobs"][:len(ids[prompt])]
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-4)
        assert choice.logprobs.text_offset == reference[prompt]["text_offset"][:len(ids[prompt])]
    assert whole.usage.prompt_tokens == sum(map(len, ids)) and whole.usage.completion_tokens == 4

    with _post(server, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}},
               stream=True) as response:
        events = [line[len(b"data: "):] for line in response.iter_lines() if line]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[-1]["usage"] == whole.usage.model_dump(exclude_none=True)
    streamed = sorted((c["choices"][0] for c in chunks[:-1]), key=lambda c: c["index"])
    assert [(c["index"], c["text"], c["finish_reason"]) for c in streamed] == \
        [(c.index, c.text, "length") for c in whole.choices]
    assert [lp for c in streamed for lp in c["logprobs"]["token_logprobs"][1:]] == \
        pytest.approx([lp for c in whole.choices for lp in c.logprobs.token_logprobs[1:]], abs=1e-4)

    refused = _post(server, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def test_responses_errors_name_the_responses_fields(server) -> None:
    """Errors raised below the Responses route (the chat request's checks, the grammar compiler,
    the engine's length check) name the Responses request's fields, not the chat route's."""
    schema_typo = {"type": "json_schema", "name": "x", "schema": {"type": "objectt"}}
    for body, param in (({"input": "hi", "text": {"format": schema_typo}}, "text.format.schema"),
                        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "strict": "yes"}}},
                         "text.format.strict"),
                        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{bad"}]},
                         "input[0].arguments"),
                        ({"input": [{"role": "user", "content": "Weather?"},
                                    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1,"}]},
                         "input[1].arguments"),
                        ({"input": "hi", "max_output_tokens": 10**6}, "max_output_tokens")):
        response = _post(server, "/v1/responses", {"model": MODEL, **body})
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["param"] == param and param in error["message"], (body, error)
        assert not any(name in error["message"] for name in ("response_format", "messages", "max_tokens")), error


def test_responses_take_reasoning_and_top_logprobs(server) -> None:
    """`reasoning` (null or an effort) is accepted and, the default model's template reading no
    reasoning variable, changes nothing; `top_logprobs` counts with include
    message.output_text.logprobs (vLLM's rule): the output_text part then carries each token's
    logprob and its alternatives, the chat route's for the same message, and a stream's deltas
    carry them too."""
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)
    question = "Name a fruit."
    common = dict(model=MODEL, input=question, max_output_tokens=4, temperature=0)
    plain = client.responses.create(**common)
    assert plain.output[0].content[0].logprobs == []
    with_top = client.responses.create(**common, top_logprobs=2)   # no include: no logprobs (vLLM, OpenAI)
    assert with_top.output_text == plain.output_text and with_top.output[0].content[0].logprobs == []
    raw_null = _post(server, "/v1/responses", {**common, "reasoning": None}).json()
    assert raw_null["output"][0]["content"][0]["text"] == plain.output_text and raw_null["reasoning"] is None

    response = client.responses.create(**common, reasoning={"effort": "low"}, top_logprobs=2,
                                       include=["message.output_text.logprobs"])
    assert response.output_text == plain.output_text and response.reasoning.effort == "low"
    logprobs = response.output[0].content[0].logprobs
    chat = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": question}],
                                                  "max_tokens": 4, "temperature": 0, "logprobs": True,
                                                  "top_logprobs": 2}).json()["choices"][0]["logprobs"]["content"]
    assert [(lp.token, [t.token for t in lp.top_logprobs]) for lp in logprobs] == \
        [(c["token"], [t["token"] for t in c["top_logprobs"]]) for c in chat]
    assert [lp.logprob for lp in logprobs] == pytest.approx([c["logprob"] for c in chat], abs=1e-4)
    assert "".join(lp.token for lp in logprobs) == response.output_text

    events = list(client.responses.create(**common, top_logprobs=1, include=["message.output_text.logprobs"],
                                          stream=True))
    deltas = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [lp.token for lp in deltas] == [lp.token for lp in logprobs]
    assert [len(lp.top_logprobs) for lp in deltas] == [1] * len(logprobs)
    assert [lp.token for lp in events[-1].response.output[0].content[0].logprobs] == [lp.token for lp in logprobs]
    bad = _post(server, "/v1/responses", {**common, "include": ["reasoning.encrypted_content"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "include"


def test_tgi_details_only_when_asked_for(server) -> None:
    """TGI's GenerateParameters.details defaults to false (serde's default): /generate and / answer
    the text alone; the stream's last event has "details": null; details (or, on /generate,
    decoder_input_details) asks for them."""
    inputs, parameters = PROMPTS[0], {"max_new_tokens": 3}
    plain = _post(server, "/generate", {"inputs": inputs, "parameters": parameters}).json()
    assert list(plain) == ["generated_text"] and plain["generated_text"]
    assert _post(server, "/", {"inputs": inputs, "parameters": parameters}).json() == [plain]
    assert _post(server, "/generate", {"inputs": inputs}).json().keys() == {"generated_text"}
    detailed = _post(server, "/generate", {"inputs": inputs, "parameters": {**parameters, "details": True}}).json()
    assert detailed["generated_text"] == plain["generated_text"] and detailed["details"]["generated_tokens"] == 3
    prefill = _post(server, "/generate", {"inputs": inputs, "parameters": {**parameters,
                                                                           "decoder_input_details": True}}).json()
    assert [t["id"] for t in prefill["details"]["prefill"]] == _ids(server, inputs)
    for asked, details in ((False, None), (True, {"finish_reason": "length", "generated_tokens": 3, "seed": None,
                                                  "input_length": len(_ids(server, inputs))})):
        stream = _post(server, "/generate_stream", {"inputs": inputs, "parameters": {**parameters, "details": asked}})
        events = [json.loads(line[5:]) for line in stream.text.splitlines() if line.startswith("data:")]
        assert len(events) == 3 and all(e["details"] is None for e in events[:-1])
        assert events[-1]["generated_text"] == plain["generated_text"] and events[-1]["details"] == details


def test_vllm_extras_at_their_default(server) -> None:
    """vLLM's early_stopping (false: this beam search, as vLLM's, has no early stop) and
    mm_processor_kwargs (null or {}: the model takes text only) are accepted at their defaults;
    anything else is a 400 naming them."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    reference = _post(server, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
    for extra in ({"mm_processor_kwargs": None}, {"mm_processor_kwargs": {}}):
        response = _post(server, "/v1/chat/completions", {**chat, **extra})
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == reference
    beams = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "n": 2, "use_beam_search": True}
    assert _post(server, "/v1/completions", {**beams, "early_stopping": False}).status_code == 200
    for path, body, param in (("/v1/completions", {**beams, "early_stopping": True}, "early_stopping"),
                              ("/v1/chat/completions", {**chat, "mm_processor_kwargs": {"size": 3}},
                               "mm_processor_kwargs")):
        response = _post(server, path, body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param and param in response.json()["error"]["message"]


def test_leaving_a_beam_search_logs_no_asyncio_noise(server) -> None:
    """A client that leaves a beam search: the searches are cancelled (nothing runs, the KV cache
    is empty) and the log holds no "exception was never retrieved" (asyncio's report of a gather
    cancelled and never awaited)."""
    offset = server.log_path.stat().st_size
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 300, "n": 4, "use_beam_search": True,
            "ignore_eos": True}
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{server.base_url}/v1/completions", json=body, timeout=(10, 1.5))
    samples = wait_idle(server.base_url, timeout=30)
    assert samples[("pagedserve:kv_cache_usage_perc", (("model_name", MODEL),))] == 0
    time.sleep(1.0)   # asyncio reports an unretrieved exception when the future is collected
    with open(server.log_path, errors="replace") as log:
        log.seek(offset)
        added = log.read()
    assert "never retrieved" not in added and "CancelledError" not in added, added[-2000:]
