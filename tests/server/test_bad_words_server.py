"""vLLM's bad_words through the float32 `server` (a real HTTP server): /v1/completions and
/v1/chat/completions give the offline engine's ids for the same SamplingParams, without the
banned word's tokens; a value that is not a list of strings (or a word of no tokens) is a 400
naming bad_words before the engine runs anything."""
from __future__ import annotations

import requests

from pagedserve import SamplingParams

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _post(server, path: str, body: dict) -> requests.Response:
    return requests.post(f"{server.base_url}{path}", json=body, timeout=120)


def _paris_ids(tokenizer) -> set[int]:
    return {t for text in ("Paris", " Paris") for t in tokenizer.encode(text, add_special_tokens=False)}


def test_completions_and_chat_ban_the_words_as_the_offline_engine(server, offline_llm) -> None:
    paris = _paris_ids(offline_llm.get_tokenizer())
    greedy = {"max_tokens": 8, "temperature": 0, "return_token_ids": True}
    plain = _post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, **greedy}).json()
    assert paris & set(plain["choices"][0]["token_ids"])   # greedy says " Paris"
    response = _post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, **greedy, "bad_words": ["Paris"]})
    assert response.status_code == 200, response.text
    got = response.json()["choices"][0]["token_ids"]
    expected = offline_llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0, bad_words=["Paris"]),
                                    use_tqdm=False)[0].outputs[0].token_ids
    assert got == expected and not paris & set(got)

    chat_plain = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, **greedy}).json()
    assert paris & set(chat_plain["choices"][0]["token_ids"])
    response = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, **greedy,
                                                      "bad_words": ["Paris"]})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    expected = offline_llm.chat(CHAT, SamplingParams(max_tokens=8, temperature=0.0, bad_words=["Paris"]),
                                use_tqdm=False)[0].outputs[0]
    assert choice["token_ids"] == expected.token_ids and not paris & set(choice["token_ids"])
    assert choice["message"]["content"] == expected.text and "Paris" not in expected.text


def test_bad_words_that_are_not_a_list_of_strings_are_a_400_naming_them(server) -> None:
    chat = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    completion = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    for path, body, param in (("/v1/completions", {**completion, "bad_words": "Paris"}, "bad_words"),
                              ("/v1/completions", {**completion, "bad_words": [1]}, "bad_words.0"),
                              ("/v1/chat/completions", {**chat, "bad_words": ["Paris", None]}, "bad_words.1"),
                              ("/v1/chat/completions", {**chat, "bad_words": {"Paris": 1}}, "bad_words"),
                              ("/v1/completions", {**completion, "bad_words": [" "]}, "bad_words"),
                              ("/v1/completions", {**completion, "n": 2, "use_beam_search": True,
                                                   "bad_words": ["Paris"]}, "bad_words")):
        response = _post(server, path, body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["param"] == param and "bad_words" in error["message"], (body, error)
    for value in ([], None, ["Paris", "answer is"]):   # a list of strings, even empty, or null
        assert _post(server, "/v1/completions", {**completion, "bad_words": value}).status_code == 200, value


def test_bad_words_banning_all_a_grammar_allows_is_a_400_naming_them(server) -> None:
    """A grammar that allows only "a", with "a" banned: the row has nothing left to sample; the
    request's own doing, a 400 naming bad_words (was the engine's 500, 'sampled token 0 does not
    match the grammar'), and the server answers the next request."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "guided_regex": "a",
            "bad_words": ["a"]}
    response = _post(server, "/v1/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "bad_words" and "ban every token" in error["message"], error
    allowed = _post(server, "/v1/completions", {**body, "bad_words": ["b"]})
    assert allowed.status_code == 200 and allowed.json()["choices"][0]["text"] == "a", allowed.text
