"""Issue 16, items 11-17: the OpenAI / vLLM behaviours clients rely on, through a real server
process (the official `openai` client where the issue talks about clients), each while good
greedy streams run in the background and must finish with their reference text.

One server for the module (two served names); a second with --enable-force-include-usage,
--return-tokens-as-token-ids and vLLM's no-op flags. Background work: 2 threads, max_tokens 6,
bounded in count and time."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import openai
import pytest
import requests

from tests.server.conftest import ServerProcess, serving, wait_idle

MODEL = "SmolLM2-135M-Instruct"
ALIAS = "smol-alias"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]
BACKGROUND_PROMPTS = ("Once upon a time", "The quick brown fox", "1, 2, 3,")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # float32: the exact path (on the default GGUF int4 path greedy ids may depend on the batch)
    yield from serving(tmp_path_factory, "behaviours", "--served-model-name", MODEL, ALIAS,
                        "--max-model-len", "1024", "--dtype", "float32")


@pytest.fixture(scope="module")
def flagged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serving(tmp_path_factory, "behaviours_flags",
                        "--enable-force-include-usage", "--return-tokens-as-token-ids", "--max-model-len", "1024",
                        "--enable-chunked-prefill", "--disable-log-requests", "--uvicorn-log-level", "info",
                        "--pipeline-parallel-size", "1", "--max-logprobs", "-1", "--dtype", "float32")


def client_of(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def client(srv) -> openai.OpenAI:
    return client_of(srv)


@pytest.fixture(scope="module")
def references(client) -> dict[str, str]:
    """Each background prompt's greedy text, sent alone."""
    return {p: client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text
            for p in BACKGROUND_PROMPTS}


@contextmanager
def background(server: ServerProcess, references: dict[str, str], threads: int = 2,
               max_requests: int = 12, max_seconds: float = 90.0) -> Iterator[None]:
    """Good greedy streams running while the body runs; each must end with its reference
    text and finish_reason "length". Bounded: max_requests per thread and max_seconds."""
    stop = threading.Event()
    failures: list[str] = []
    done = [0]
    client = client_of(server)
    deadline = time.monotonic() + max_seconds

    def work(offset: int) -> None:
        for i in range(max_requests):
            if (stop.is_set() and i > 0) or time.monotonic() > deadline:
                return
            prompt = BACKGROUND_PROMPTS[(offset + i) % len(BACKGROUND_PROMPTS)]
            try:
                chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                                        stream=True))
                text = "".join(c.choices[0].text for c in chunks)
                reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
                if text != references[prompt] or reasons != ["length"]:
                    failures.append(f"{prompt!r}: {text!r} {reasons}")
                done[0] += 1
            except Exception as exc:   # noqa: BLE001 -- reported below
                failures.append(f"{prompt!r}: {type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=max_seconds)
    assert not failures, failures
    assert done[0] >= threads


# ---- 11: stream_options ----------------------------------------------------------------------

def test_stream_usage_only_when_asked(client, srv, references) -> None:
    with background(srv, references):
        for stream_options in (None, {}, {"include_usage": False}, {"continuous_usage_stats": True}):
            kwargs = {} if stream_options is None else {"stream_options": stream_options}
            chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                                         stream=True, **kwargs))
            assert chunks and all(c.usage is None for c in chunks), stream_options
            assert all(len(c.choices) == 1 for c in chunks)   # chunk.choices[0] never fails
            completions = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                                         stream=True, **kwargs))
            assert completions and all(c.usage is None and len(c.choices) == 1 for c in completions)


def test_continuous_usage_on_every_chat_chunk(client, srv, references) -> None:
    with background(srv, references):
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=5, temperature=0, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is not None for c in chunks)
    prompt_tokens = chunks[-1].usage.prompt_tokens
    assert prompt_tokens > 0 and all(c.usage.prompt_tokens == prompt_tokens for c in chunks)
    assert chunks[0].usage.completion_tokens == 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


# ---- 12: one finish_reason per choice --------------------------------------------------------

def test_finish_reason_once_per_choice(client, srv, references) -> None:
    with background(srv, references):
        chat = list(client.chat.completions.create(model=MODEL, messages=CHAT, temperature=1.0, seed=3, n=3,
                                                   max_tokens=12, stream=True))
        completions = list(client.completions.create(model=MODEL, prompt=[PROMPT, "One, two,"], n=2,
                                                     temperature=1.0, seed=3, max_tokens=12, stream=True))
    for chunks, expected in ((chat, [0, 1, 2]), (completions, [0, 1, 2, 3])):
        finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason is not None]
        assert sorted(finishes) == expected


# ---- 13: OpenAI spec fields ------------------------------------------------------------------

def test_spec_fields_accepted_and_ignored(client, srv, references) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    history = [{"role": "system", "content": "Be brief.", "name": "sys"}, *CHAT,
               {"role": "assistant", "content": "Red.", "refusal": None, "tool_calls": []},
               {"role": "user", "content": "And two more?"}]
    with background(srv, references):
        result = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=8, temperature=0, store=False, metadata={"team": "a"},
            service_tier="auto", user="u-1", parallel_tool_calls=True,
            extra_body={"prompt_cache_key": "k", "safety_identifier": "s", "modalities": ["text"]})
        with_history = client.chat.completions.create(model=MODEL, messages=history, max_tokens=4, temperature=0)
        completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, user="u-2")
    assert result.choices[0].message.content == plain.choices[0].message.content
    assert with_history.choices[0].message.content and completion.choices[0].text
    assert "ignored: store, metadata, service_tier, user" in srv.log_tail(20000)


@pytest.mark.parametrize("extra, param", [
    ({"verbosity": "high"}, "verbosity"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),   # not one of OpenAI's values
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"messages": [{"role": "assistant", "content": None,   # tool_calls are accepted; bad arguments are not
                    "tool_calls": [{"id": "1", "type": "function",
                                    "function": {"name": "f", "arguments": "{bad"}}]}]}, "messages"),
])
def test_output_changing_fields_rejected(srv, extra, param) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, **extra}
    response = requests.post(f"{srv.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert param in (response.json()["error"]["param"] or "") + response.json()["error"]["message"]


# ---- 14: prompt_logprobs null; 15: created ---------------------------------------------------

def test_prompt_logprobs_null_and_created_now(client, srv, references) -> None:
    with background(srv, references):
        before = int(time.time())
        completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
        stream = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, stream=True))
        after = int(time.time())
    assert completion.choices[0].prompt_logprobs is None   # an attribute, as openai-python reads it
    assert chat.prompt_logprobs is None
    asked = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 1})
    assert asked.choices[0].prompt_logprobs[0] is None and len(asked.choices[0].prompt_logprobs) > 1
    models = requests.get(f"{srv.base_url}/v1/models", timeout=10).json()
    for created in [completion.created, chat.created, *(c.created for c in stream), models["data"][0]["created"]]:
        assert before <= created <= after + 1


# ---- 16: unknown model; 17: several served names ---------------------------------------------

def test_unknown_model_is_404_and_aliases_work(client, srv, references) -> None:
    with background(srv, references):
        with pytest.raises(openai.NotFoundError) as raised:
            client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=3)
        by_alias = client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=3)
    error = raised.value.body
    assert raised.value.status_code == 404 and error["type"] == "NotFoundError" and error["param"] == "model"
    response = requests.post(f"{srv.base_url}/v1/completions", json={"model": "nope", "prompt": "a"}, timeout=10)
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    assert by_alias.model == MODEL   # the first name is the one reported
    assert [m.id for m in client.models.list().data] == [MODEL, ALIAS]


# ---- 17: vLLM request features ---------------------------------------------------------------

def test_return_token_ids_and_truncate_prompt_tokens(client, srv, references) -> None:
    """truncate_prompt_tokens keeps the last k tokens; a 12 MB prompt cut so is read from a suffix
    (PromptLengthBound.tail_ids), not tokenized whole, and gets the same last ids as a short text
    of the same ending, while good streams run beside it."""
    full = requests.post(f"{srv.base_url}/tokenize", json={"prompt": PROMPT}, timeout=10).json()["tokens"]
    huge = "One two three four. " * 600_000 + PROMPT
    ending = requests.post(f"{srv.base_url}/tokenize", json={"prompt": huge[-400:]}, timeout=10).json()["tokens"]
    with background(srv, references):
        cut = requests.post(f"{srv.base_url}/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": huge, "max_tokens": 2, "temperature": 0, "return_token_ids": True,
            "truncate_prompt_tokens": 6})
        result = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                           extra_body={"return_token_ids": True, "truncate_prompt_tokens": 3})
        chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0,
                                              extra_body={"return_token_ids": True})
        bad = [requests.post(f"{srv.base_url}/v1/completions", timeout=10,
                             json={"model": MODEL, "prompt": PROMPT, "truncate_prompt_tokens": k}) for k in (0, -2, 5000)]
    choice = result.choices[0].model_extra
    assert choice["prompt_token_ids"] == full[-3:] and result.usage.prompt_tokens == 3
    assert cut.status_code == 200, cut.text[:300]
    assert cut.json()["choices"][0]["prompt_token_ids"] == ending[-6:] and cut.json()["usage"]["prompt_tokens"] == 6
    assert len(choice["token_ids"]) == 4
    assert chat.model_extra["prompt_token_ids"] and len(chat.choices[0].model_extra["token_ids"]) == 4
    for response in bad:
        assert response.status_code == 400 and response.json()["error"]["param"] == "truncate_prompt_tokens"


def test_chat_echo_continues_last_message(client, srv, references) -> None:
    messages = [*CHAT, {"role": "assistant", "content": "Red, green"}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    body = {"add_generation_prompt": False, "continue_final_message": True}
    with background(srv, references):
        plain = client.chat.completions.create(**kwargs, extra_body=body)
        echoed = client.chat.completions.create(**kwargs, extra_body={**body, "echo": True})
        stream = list(client.chat.completions.create(**kwargs, stream=True, extra_body={**body, "echo": True}))
    assert echoed.choices[0].message.content == "Red, green" + plain.choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in stream) == echoed.choices[0].message.content


def test_reasoning_effort_reaches_the_chat_template(client, srv, references) -> None:
    """Chat's reasoning_effort reaches the template as vLLM hands it (reasoning_effort, and
    enable_thinking false only for "none"), under the request's own chat_template_kwargs; the
    default model's template reads neither, so its answer is the one without."""
    template = ("{% if enable_thinking %}Think {{ reasoning_effort }} and hard. {% endif %}"
                "{{ messages[0]['content'] }}")
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=4, temperature=0)

    def prompt_tokens(**extra) -> int:
        return client.chat.completions.create(**kwargs, extra_body={"chat_template": template, **extra}
                                              ).usage.prompt_tokens
    with background(srv, references):
        plain = client.chat.completions.create(**kwargs)
        effort = client.chat.completions.create(**kwargs, reasoning_effort="high")
        bare, high, none = prompt_tokens(), prompt_tokens(reasoning_effort="high"), prompt_tokens(reasoning_effort="none")
        minimal = prompt_tokens(reasoning_effort="minimal")
        overridden = prompt_tokens(reasoning_effort="high", chat_template_kwargs={"enable_thinking": False})
        bad = requests.post(f"{srv.base_url}/v1/chat/completions", timeout=30,
                            json={"model": MODEL, "messages": CHAT, "max_tokens": 4, "reasoning_effort": "extreme"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_effort", bad.text
    assert effort.choices[0].message.content == plain.choices[0].message.content
    assert high > bare and minimal > bare and none == bare and overridden == bare


def test_tokenizer_info(srv) -> None:
    info = requests.get(f"{srv.base_url}/tokenizer_info", timeout=10).json()
    assert info["tokenizer_class"] and "{%" in info["chat_template"]


def test_vllm_metrics_exported(client, srv) -> None:
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, n=2)
    samples = wait_idle(srv.base_url)
    label = (("model_name", MODEL),)
    for name in ("inter_token_latency_seconds", "request_prompt_tokens", "request_generation_tokens",
                 "request_params_n", "request_params_max_tokens", "request_inference_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "iteration_tokens_total"):
        assert samples[(f"pagedserve:{name}_count", label)] > 0, name
    assert samples[("pagedserve:request_params_n_bucket", (("le", "1.0"), ("model_name", MODEL)))] \
        < samples[("pagedserve:request_params_n_bucket", (("le", "2.0"), ("model_name", MODEL)))]
    info = [value for (name, _), value in samples.items() if name == "pagedserve:cache_config_info"]
    assert info == [1.0]
    # the default model (135M parameters, GGUF dequantized to fp32) reports what its weights take
    assert 4e8 < samples[("pagedserve:model_weight_bytes", (("quantization", "gguf"),))] < 8e8


# ---- 17: server flags ------------------------------------------------------------------------

def test_force_include_usage_and_token_id_strings(flagged) -> None:
    client = client_of(flagged)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    chat = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, stream=True))
    assert chat[-1].usage.completion_tokens == 4
    result = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, logprobs=True, top_logprobs=2)
    tokens = [entry.token for entry in result.choices[0].logprobs.content]
    assert len(tokens) == 3 and all(t.startswith("token_id:") and t[9:].isdigit() for t in tokens)
    as_text = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, logprobs=True,
                                             extra_body={"return_tokens_as_token_ids": False})
    assert not as_text.choices[0].logprobs.content[0].token.startswith("token_id:")
    assert "--enable-chunked-prefill is accepted for vLLM compatibility" in flagged.log_tail(20000)


def test_logprobs_minus_one_is_the_whole_vocabulary(srv, flagged) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logprobs": -1}
    refused = requests.post(f"{srv.base_url}/v1/completions", json=body, timeout=30)   # default cap: 20
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
    result = requests.post(f"{flagged.base_url}/v1/completions", json=body, timeout=60)
    assert result.status_code == 200, result.text
    top = result.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    assert len(top) > 10000   # token_id:N strings, one per vocabulary entry
    chat = requests.post(f"{flagged.base_url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": CHAT, "max_tokens": 1, "logprobs": True, "top_logprobs": -1})
    assert chat.status_code == 200 and len(chat.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) > 10000


def test_missing_feature_flag_fails_clearly() -> None:
    result = subprocess.run([sys.executable, "-m", "pagedserve.cli", "serve", "--speculative-config", "{}"],
                            capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 2 and "--speculative-config: not supported by pagedserve (no speculative decoding)" \
        in result.stderr
    assert "--lora-modules needs --enable-lora" in _serve_fails("--lora-modules", "a=/nowhere")


def _serve_fails(*flags: str) -> str:
    """stderr of `pagedserve serve FLAGS`, which must exit 2 (a clear error) before loading the model."""
    result = subprocess.run([sys.executable, "-m", "pagedserve.cli", "serve", *flags], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "model loaded" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr


def test_a_bad_or_taken_port_fails_before_the_model_loads() -> None:
    """The socket is bound first (as vLLM does): a port out of range, or one another process
    listens on, is a clear error at once, not a traceback after the load."""
    assert "--port must be in 0-65535, got 99999 (parameter: port)" in _serve_fails("--port", "99999")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stderr = _serve_fails("--host", "127.0.0.1", "--port", str(port))
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use (parameter: port)" in stderr
    assert "tensor_parallel_size must be >= 1, got 0" in _serve_fails("--tensor-parallel-size", "0")
