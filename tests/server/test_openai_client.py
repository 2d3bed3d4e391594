"""The official `openai` client against a real server: completions and chat, with and
without streaming, include_usage, n=2, logprobs, stop, echo."""
from __future__ import annotations

import openai
import pytest
import requests

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def greedy(client) -> openai.types.Completion:
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)


def test_completion(greedy) -> None:
    assert greedy.object == "text_completion" and greedy.id.startswith("cmpl-") and greedy.model == MODEL
    choice = greedy.choices[0]
    assert choice.index == 0 and choice.text and choice.finish_reason == "length"
    assert greedy.usage.completion_tokens == 12 and greedy.usage.prompt_tokens > 0
    assert greedy.usage.total_tokens == greedy.usage.prompt_tokens + 12


def test_completion_stream_with_usage(client, greedy) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert len(text_chunks) > 1 and all(c.usage is None for c in text_chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == greedy.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.model_dump() == greedy.usage.model_dump()


def test_completion_n2(client) -> None:
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, n=2)
    assert sorted(c.index for c in result.choices) == [0, 1]
    assert result.usage.completion_tokens == 16


def test_completion_logprobs(client, greedy) -> None:
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2)
    choice = result.choices[0]
    assert choice.text == greedy.choices[0].text
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 2 <= len(top) <= 3
        assert top[token] == logprob and max(top.values()) == logprob   # greedy picks the top token


def test_completion_stop(client, greedy) -> None:
    text = greedy.choices[0].text
    stop = text.split()[2]   # a word from the middle of the greedy output
    result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    choice = result.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == stop
    assert choice.text == text[:text.index(stop)]


def test_completion_echo_and_prompt_forms(client, greedy) -> None:
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + greedy.choices[0].text
    ids = requests.post(f"{client.base_url}".replace("/v1/", "/tokenize"), json={"prompt": PROMPT},
                        timeout=10).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == greedy.choices[0].text
    several = client.completions.create(model=MODEL, prompt=[PROMPT, "One, two,"], max_tokens=4, temperature=0, n=2)
    assert sorted(c.index for c in several.choices) == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == greedy.choices[0].text[:len(several.choices[0].text)]


def test_chat(client) -> None:
    result = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    message = result.choices[0].message
    assert message.role == "assistant" and message.content
    assert result.usage.completion_tokens <= 16 and result.usage.prompt_tokens > 10


def test_chat_stream(client) -> None:
    reference = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    finish = chunks[-2].choices[0]
    assert finish.finish_reason == reference.choices[0].finish_reason and not finish.delta.content
    content = "".join(c.choices[0].delta.content or "" for c in chunks[1:-2])
    assert content == reference.choices[0].message.content
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == reference.usage.model_dump()


def test_chat_logprobs_n2_multiturn(client) -> None:
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}]
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, n=2,
                                            logprobs=True, top_logprobs=2)
    assert [c.index for c in result.choices] == [0, 1]
    assert result.choices[0].message.content == result.choices[1].message.content   # greedy: identical
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens // 2
    assert "".join(entry.token for entry in content).startswith(result.choices[0].message.content)
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.bytes == list(entry.token.encode())


def test_models_tokenize_version(client, server) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].model_extra["max_model_len"] > 0
    tokens = requests.post(f"{server.base_url}/tokenize", json={"prompt": PROMPT}, timeout=10).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = requests.post(f"{server.base_url}/detokenize", json={"tokens": tokens["tokens"]}, timeout=10).json()
    assert text == {"prompt": PROMPT}
    assert requests.get(f"{server.base_url}/version", timeout=10).json()["version"]
