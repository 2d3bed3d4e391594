"""use_beam_search on the OpenAI routes (server/beam.py), through the float32 `server`: the
same beams as the offline LLM.beam_search, in one piece when streamed; what a beam search
does not apply is a 400 naming the field. The search itself against transformers:
tests/unit/test_beam_search.py."""
from __future__ import annotations

import json

import requests

from pagedserve import BeamSearchParams

PROMPT = "The capital of France is"


def _post(server, path: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(f"{server.base_url}{path}", json=body, timeout=120, **kwargs)


def test_completion_beams_match_the_offline_beam_search(server, offline_llm) -> None:
    [reference] = offline_llm.beam_search([PROMPT], BeamSearchParams(beam_width=3, max_tokens=8))
    prompt_ids = offline_llm.get_tokenizer()(PROMPT)["input_ids"]
    body = {"prompt": PROMPT, "max_tokens": 8, "n": 3, "use_beam_search": True, "return_token_ids": True,
            "logprobs": 1}
    result = _post(server, "/v1/completions", body).json()
    choices = result["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert [c["token_ids"] for c in choices] == [s.tokens[len(prompt_ids):] for s in reference.sequences]
    assert [PROMPT + c["text"] for c in choices] == [s.text for s in reference.sequences]
    assert all(len(c["logprobs"]["tokens"]) == len(c["token_ids"]) for c in choices)
    assert {c["finish_reason"] for c in choices} == {"stop", "length"}   # this prompt has both kinds
    for c, s in zip(choices, reference.sequences):
        # the chosen tokens' logprobs sum to the beam's score; a beam that ended also counts its
        # end-of-sequence token's (not in its token ids: include_stop_str_in_output is false)
        shown = sum(c["logprobs"]["token_logprobs"])
        assert abs(shown - s.cum_logprob) < 1e-3 if c["finish_reason"] == "length" else shown > s.cum_logprob
    assert result["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in choices)
    # streamed: the same choices in one piece, then [DONE]
    with _post(server, "/v1/completions", {**body, "stream": True}, stream=True) as response:
        events = [line[len(b"data: "):] for line in response.iter_lines() if line]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert sorted((c["choices"][0]["index"], c["choices"][0]["text"]) for c in chunks) == \
        [(c["index"], c["text"]) for c in choices]


def test_chat_beams(server) -> None:
    body = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 6, "n": 2,
            "use_beam_search": True, "length_penalty": 0.5}
    result = _post(server, "/v1/chat/completions", body).json()
    assert [c["index"] for c in result["choices"]] == [0, 1]
    assert all(c["message"]["role"] == "assistant" and c["finish_reason"] in ("stop", "length")
               for c in result["choices"])
    contents = [c["message"]["content"] for c in result["choices"]]
    assert contents[0] != contents[1]
    with _post(server, "/v1/chat/completions", {**body, "stream": True}, stream=True) as response:
        events = [line[len(b"data: "):] for line in response.iter_lines() if line]
    assert events[-1] == b"[DONE]"
    streamed = {0: "", 1: ""}
    reasons = {}
    for chunk in map(json.loads, events[:-1]):
        for choice in chunk["choices"]:
            streamed[choice["index"]] += choice["delta"].get("content") or ""
            if choice["finish_reason"] is not None:
                reasons[choice["index"]] = choice["finish_reason"]
    assert [streamed[0], streamed[1]] == contents
    assert reasons == {i: c["finish_reason"] for i, c in enumerate(result["choices"])}


def test_what_beam_search_does_not_apply_is_a_400_naming_it(server) -> None:
    base = {"prompt": "Hi", "max_tokens": 2, "use_beam_search": True}
    for extra, param in [({"stop": ["x"]}, "stop"), ({"presence_penalty": 0.5}, "presence_penalty"),
                         ({"n": 11}, "n"), ({"structured_outputs": {"choice": ["a", "b"]}}, "use_beam_search"),
                         ({"max_tokens": 10**6}, "max_tokens"), ({"logit_bias": {"5": 1}}, "logit_bias"),
                         ({"priority": 3}, "priority"), ({"bad_words": ["Hello"]}, "bad_words")]:
        response = _post(server, "/v1/completions", {**base, **extra})
        assert response.status_code == 400, (extra, response.text)
        if param is not None:
            assert response.json()["error"]["param"] == param, (extra, response.text)
    response = _post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "length_penalty": 2.0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "length_penalty"
    response = requests.post(f"{server.base_url}/v1/completions", timeout=30, headers={
        "content-type": "application/json"}, data=b'{"prompt": "Hi", "use_beam_search": true, "length_penalty": 1e999}')
    assert response.status_code == 400, response.text
