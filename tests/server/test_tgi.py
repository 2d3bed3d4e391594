"""The TGI routes against real server processes: huggingface_hub's InferenceClient
(plain, details, stream, stop, seed, best_of), raw HTTP for every validation rule, a 429
burst, decoder_input_details, top_n_tokens, truncate, /tokenize in both shapes, and
configuration from TGI's environment variables alone, reflected in /info."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError as HFValidationError

from pagedserve import SamplingParams
from pagedserve.errors import ValidationError
from pagedserve.server.serve import make_parser
from pagedserve.server.tgi_settings import apply_tgi_settings
from tests.server.conftest import API_KEY, ServerProcess, free_port, scrape_metrics, start_server

PROMPT = "The capital of France is"
MODEL = "SmolLM2-135M-Instruct"
REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_LIMITS = {"MAX_TOTAL_TOKENS": "512", "MAX_INPUT_TOKENS": "64", "MAX_CONCURRENT_REQUESTS": "2",
              "MAX_BEST_OF": "3", "MAX_STOP_SEQUENCES": "2", "MAX_TOP_N_TOKENS": "3"}


def _clean_env() -> dict[str, str]:
    tgi_names = {"MODEL_ID", "NUM_SHARD", "QUANTIZE", "DTYPE", "MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH", "PORT",
                 "MAX_TOTAL_TOKENS", "MAX_BATCH_PREFILL_TOKENS", "API_KEY", "PAGEDSERVE_API_KEY",
                 *ENV_LIMITS}
    return {k: v for k, v in os.environ.items() if k not in tgi_names}


@pytest.fixture(scope="module")
def env_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """Configured by environment variables alone: no flag names the port or any limit."""
    env = {**_clean_env(), **ENV_LIMITS, "PORT": str(free_port())}
    proc = start_server(tmp_path_factory.mktemp("tgi_env_server"), "server", env=env)
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server) -> InferenceClient:
    return InferenceClient(base_url=server.base_url, timeout=60)


@pytest.fixture(scope="module")
def greedy_text(offline_llm) -> str:
    return offline_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0] \
        .outputs[0].text


def _post(base_url: str, parameters: dict, route: str = "/generate", inputs: str = PROMPT, **extra) \
        -> requests.Response:
    return requests.post(f"{base_url}{route}", json={"inputs": inputs, "parameters": parameters, **extra},
                         timeout=60)


def _token_ids(base_url: str, text: str) -> list[int]:
    response = requests.post(f"{base_url}/tokenize", json={"inputs": text}, timeout=10)
    response.raise_for_status()
    return [t["id"] for t in response.json()]


# ---- huggingface_hub's InferenceClient ----------------------------------------------------

def test_plain_equals_offline_greedy(client, greedy_text) -> None:
    assert client.text_generation(PROMPT, max_new_tokens=12) == greedy_text


def test_details(client, server, greedy_text) -> None:
    out = client.text_generation(PROMPT, max_new_tokens=12, details=True)
    assert out.generated_text == greedy_text
    d = out.details
    assert d.finish_reason == "length" and d.generated_tokens == 12 and d.seed is None and d.prefill == []
    assert len(d.tokens) == 12 and "".join(t.text for t in d.tokens) == greedy_text
    assert all(t.logprob <= 0 and t.special is False for t in d.tokens)


def test_stream(client, server, greedy_text) -> None:
    tokens = list(client.text_generation(PROMPT, max_new_tokens=12, stream=True))
    assert "".join(tokens) == greedy_text
    events = list(client.text_generation(PROMPT, max_new_tokens=12, stream=True, details=True))
    assert len(events) == 12 and [e.index for e in events] == list(range(1, 13))
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == greedy_text == "".join(e.token.text for e in events)
    assert last.details.finish_reason == "length" and last.details.generated_tokens == 12
    assert last.details.input_length == len(_token_ids(server.base_url, PROMPT))


def test_stop_sequence(client, greedy_text) -> None:
    stop = greedy_text.strip()[2:5]
    expected = greedy_text[:greedy_text.index(stop) + len(stop)]   # TGI keeps the stop sequence
    out = client.text_generation(PROMPT, max_new_tokens=12, stop=[stop], details=True)
    assert out.generated_text == expected and out.details.finish_reason == "stop_sequence"
    streamed = list(client.text_generation(PROMPT, max_new_tokens=12, stop=[stop], stream=True, details=True))
    assert streamed[-1].generated_text == expected and streamed[-1].details.finish_reason == "stop_sequence"


def test_seed_and_full_text(client) -> None:
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=50, seed=1234, details=True)
    first, second = client.text_generation(PROMPT, **kwargs), client.text_generation(PROMPT, **kwargs)
    assert first.generated_text == second.generated_text and first.details.seed == 1234
    full = client.text_generation(PROMPT, return_full_text=True, **kwargs)
    assert full.generated_text == PROMPT + first.generated_text
    # no seed given: one is drawn and reported; the draw may sample EOS before the 4th token
    typical = client.text_generation(PROMPT, max_new_tokens=4, do_sample=True, typical_p=0.5, details=True)
    details = typical.details
    assert isinstance(details.seed, int) and details.generated_tokens == len(details.tokens)
    assert (details.finish_reason == "length" and details.generated_tokens == 4) or \
        (details.finish_reason == "eos_token" and details.generated_tokens <= 4 and details.tokens[-1].special)


def test_best_of(client) -> None:
    out = client.text_generation(PROMPT, max_new_tokens=6, do_sample=True, best_of=2, details=True)
    others = out.details.best_of_sequences
    assert len(others) == 1 and others[0].generated_tokens == len(others[0].tokens)
    assert out.details.seed is not None and {out.details.seed, others[0].seed} == \
        {min(out.details.seed, others[0].seed), min(out.details.seed, others[0].seed) + 1}
    best = sum(t.logprob for t in out.details.tokens)
    assert best >= sum(t.logprob for t in others[0].tokens) - 1e-4   # the best by cumulative logprob
    with pytest.raises(HFValidationError, match="you must use sampling"):
        client.text_generation(PROMPT, max_new_tokens=2, best_of=2)


# ---- raw HTTP ------------------------------------------------------------------------------

def test_generate_and_compat_routes(server, greedy_text) -> None:
    body = _post(server.base_url, {"max_new_tokens": 12, "details": False}).json()
    assert body == {"generated_text": greedy_text}
    listed = _post(server.base_url, {"max_new_tokens": 12, "details": False}, route="/").json()
    assert listed == [{"generated_text": greedy_text}]   # POST / answers a list
    streamed = requests.post(f"{server.base_url}/", json={"inputs": PROMPT, "stream": True,
                                                          "parameters": {"max_new_tokens": 3}}, timeout=60)
    events = [line for line in streamed.text.splitlines() if line.startswith("data:")]
    assert streamed.headers["content-type"].startswith("text/event-stream") and len(events) == 3


def test_decoder_input_details(server) -> None:
    ids = _token_ids(server.base_url, PROMPT)
    d = _post(server.base_url, {"max_new_tokens": 2, "decoder_input_details": True}).json()["details"]
    assert [t["id"] for t in d["prefill"]] == ids
    assert d["prefill"][0]["logprob"] is None and all(t["logprob"] <= 0 for t in d["prefill"][1:])


def test_top_n_tokens(server) -> None:
    d = _post(server.base_url, {"max_new_tokens": 4, "top_n_tokens": 3, "details": True}).json()["details"]
    assert len(d["top_tokens"]) == 4
    for token, top in zip(d["tokens"], d["top_tokens"]):
        assert len(top) == 3 and top[0]["id"] == token["id"]   # greedy: the chosen token is the best
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)


@pytest.mark.parametrize("route", ["/generate", "/generate_stream"])
def test_top_n_tokens_under_a_grammar(server, route) -> None:
    """The regex "a" leaves one token possible at the first step: its alternatives' -inf logprobs
    come back clamped at -9999.0 (JSON has no infinities; the request failed with a 500 before)."""
    response = _post(server.base_url, {"max_new_tokens": 2, "top_n_tokens": 3, "details": True,
                                       "grammar": {"type": "regex", "value": "a"}}, route=route)
    assert response.status_code == 200, response.text
    if route == "/generate":
        first = response.json()["details"]["top_tokens"][0]
    else:
        events = [line[5:] for line in response.text.splitlines() if line.startswith("data:")]
        first = json.loads(events[0])["top_tokens"]
    assert first[0]["text"] == "a" and first[0]["logprob"] > -9999.0
    assert [t["logprob"] for t in first[1:]] == [-9999.0, -9999.0]


def test_truncate_keeps_last_tokens(server) -> None:
    long_input = "One two three four five six seven eight nine ten. " + PROMPT
    ids = _token_ids(server.base_url, long_input)
    d = _post(server.base_url, {"max_new_tokens": 2, "truncate": 5, "decoder_input_details": True},
              inputs=long_input).json()["details"]
    assert [t["id"] for t in d["prefill"]] == ids[-5:]
    # a 12 MB input cut to its last tokens is read from a suffix, with the same ids
    huge = "One two three four five six seven eight nine ten. " * 240_000 + PROMPT
    d = _post(server.base_url, {"max_new_tokens": 2, "truncate": 5, "decoder_input_details": True},
              inputs=huge).json()["details"]
    assert [t["id"] for t in d["prefill"]] == ids[-5:]
    events = _post(server.base_url, {"max_new_tokens": 2, "truncate": 5, "details": True}, route="/generate_stream",
                   inputs=long_input).text
    assert '"input_length":5' in events


VALIDATION_CASES = [
    ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
    ({"temperature": 0.0}, "`temperature` must be strictly positive"),
    ({"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"typical_p": 0.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"watermark": True}, "watermark is not supported"),
    ({"grammar": {"type": "xml", "value": "a+"}},
     'parameters.grammar.type must be "json", "json_object", "regex" or "json_schema", got \'xml\''),
]


@pytest.mark.parametrize("parameters,message", VALIDATION_CASES)
def test_validation_rules(server, parameters, message) -> None:
    response = _post(server.base_url, {"max_new_tokens": 2, **parameters})
    assert response.status_code == 422
    assert response.json() == {"error": message, "error_type": "validation"}


def test_validation_rules_of_stream_and_body(server) -> None:
    base = server.base_url
    for parameters, message in (
            ({"best_of": 2, "do_sample": True}, "`best_of` != 1 is not supported when streaming tokens"),
            ({"decoder_input_details": True},
             "`decoder_input_details` == true is not supported when streaming tokens")):
        response = _post(base, {"max_new_tokens": 2, **parameters}, route="/generate_stream")
        assert response.status_code == 422 and response.json() == {"error": message, "error_type": "validation"}
    empty = _post(base, {"max_new_tokens": 2}, inputs="")
    assert empty.status_code == 422 and empty.json()["error"] == "`inputs` cannot be empty"
    unknown = _post(base, {"max_new_tokens": 2, "beam_width": 4})
    assert unknown.status_code == 422 and "beam_width" in unknown.json()["error"]
    broken = requests.post(f"{base}/generate", data=b"{not json", headers={"content-type": "application/json"},
                           timeout=10)
    assert broken.status_code == 422 and broken.json()["error_type"] == "validation"


def test_tokenize_both_shapes(server) -> None:
    tgi = requests.post(f"{server.base_url}/tokenize", json={"inputs": "Hello world"}, timeout=10).json()
    assert [(t["text"], t["start"], t["stop"]) for t in tgi] == [("Hello", 0, 5), (" world", 5, 11)]
    vllm = requests.post(f"{server.base_url}/tokenize", json={"prompt": "Hello world"}, timeout=10).json()
    assert vllm["tokens"] == [t["id"] for t in tgi] and vllm["count"] == 2


def test_tgi_metrics(server) -> None:
    _post(server.base_url, {"max_new_tokens": 2})
    _post(server.base_url, {"max_new_tokens": 2, "top_k": 0})
    samples = scrape_metrics(server.base_url)
    assert samples[("tgi_request_count", ())] >= 2 and samples[("tgi_request_success", ())] >= 1
    assert samples[("tgi_request_failure", (("err", "validation"),))] >= 1
    assert samples[("tgi_request_generated_tokens_count", ())] >= 1
    assert samples[("tgi_request_duration_count", ())] >= 1 and ("tgi_queue_size", ()) in samples
    assert ("tgi_batch_current_size", ()) in samples and ("tgi_request_queue_duration_count", ()) in samples


def test_api_key_guards_tgi_routes(auth_server) -> None:
    denied = _post(auth_server.base_url, {"max_new_tokens": 2})
    assert denied.status_code == 401 and denied.json()["error_type"] == "authentication"
    allowed = requests.post(f"{auth_server.base_url}/generate", headers={"Authorization": f"Bearer {API_KEY}"},
                            json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "details": True}}, timeout=60)
    assert allowed.status_code == 200 and allowed.json()["details"]["generated_tokens"] == 2
    assert requests.get(f"{auth_server.base_url}/info", timeout=10).json()["max_total_tokens"] == 1024


# ---- configuration from the environment ------------------------------------------------------

def test_info_reflects_environment(env_server) -> None:
    info = requests.get(f"{env_server.base_url}/info", timeout=10).json()   # served on $PORT
    assert info["model_id"] == MODEL and info["max_total_tokens"] == 512 and info["max_input_tokens"] == 64
    assert info["max_concurrent_requests"] == 2 and info["max_best_of"] == 3
    assert info["max_stop_sequences"] == 2 and info["max_top_n_tokens"] == 3
    assert info["max_client_batch_size"] == 4 and info["version"]


def test_environment_limits_enforced(env_server) -> None:
    base = env_server.base_url
    long_input = " ".join(["word"] * 80)
    n = len(_token_ids(base, long_input))
    response = _post(base, {"max_new_tokens": 2}, inputs=long_input)
    assert response.status_code == 422
    assert response.json()["error"] == f"`inputs` must have less than 64 tokens. Given: {n}"
    num_prompt = len(_token_ids(base, PROMPT))
    response = _post(base, {"max_new_tokens": 510})
    assert response.json()["error"] == (f"`inputs` tokens + `max_new_tokens` must be <= 512. Given: {num_prompt} "
                                        "`inputs` tokens and 510 `max_new_tokens`")
    response = _post(base, {"max_new_tokens": 2, "truncate": 65})
    assert response.json()["error"] == "`truncate` must be strictly positive and less than 64. Given: 65"
    assert _post(base, {"max_new_tokens": 2, "stop": ["x", "y", "z"]}).json()["error"] == \
        "`stop` supports up to 2 stop sequences. Given: 3"
    assert _post(base, {"max_new_tokens": 2, "best_of": 3, "do_sample": True}).status_code == 200


def test_overload_429(env_server) -> None:
    """Two streams in flight (MAX_CONCURRENT_REQUESTS=2): a third request is a 429; once
    they finish, requests are served again."""
    base = env_server.base_url
    body = {"inputs": "Count from 1 to 1000: 1, 2, 3, 4, 5,", "parameters": {"max_new_tokens": 400}}
    streams = [requests.post(f"{base}/generate_stream", json=body, stream=True, timeout=60) for _ in range(2)]
    try:
        lines = [response.iter_lines(decode_unicode=True) for response in streams]   # kept: dropping one closes it
        for response, stream_lines in zip(streams, lines):
            assert response.status_code == 200
            assert next(stream_lines).startswith("data:")   # in flight
        for route in ("/generate", "/generate_stream"):
            overloaded = _post(base, {"max_new_tokens": 2}, route=route)
            assert overloaded.status_code == 429
            assert overloaded.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    finally:
        for response in streams:
            response.close()
    ok = None
    for _ in range(50):   # the closed streams release their slots once the server sees them go
        ok = _post(base, {"max_new_tokens": 2})
        if ok.status_code == 200:
            break
    assert ok is not None and ok.status_code == 200
    assert scrape_metrics(base)[("tgi_request_failure", (("err", "overloaded"),))] >= 2


def test_flags_win_over_environment() -> None:
    env = {"MAX_TOTAL_TOKENS": "512", "PORT": "9001", "MODEL_ID": "env/model", "MAX_INPUT_LENGTH": "100",
           "MAX_BATCH_PREFILL_TOKENS": "1024", "DTYPE": "bfloat16", "API_KEY": "k", "NUM_SHARD": "1"}
    args = make_parser().parse_args(["--max-total-tokens", "256", "--port", "8123", "--model-id", "flag/model"])
    settings = apply_tgi_settings(args, env)
    assert (args.max_model_len, args.port, args.model, args.dtype) == (256, 8123, "flag/model", "bfloat16")
    assert (args.max_num_batched_tokens, args.api_key, args.tensor_parallel_size) == (1024, "k", 1)
    assert settings.max_input_tokens == 100 and settings.max_concurrent_requests == 128
    args = make_parser().parse_args(["some/model"])
    apply_tgi_settings(args, env)
    assert args.model is None and args.model_tag == "some/model"   # MODEL wins over MODEL_ID
    assert args.port == 9001 and args.max_model_len == 512
    args = make_parser().parse_args([])
    apply_tgi_settings(args, {"QUANTIZE": "awq"})
    assert args.quantization == "awq"
    with pytest.raises(ValidationError, match="two quantizations given"):
        apply_tgi_settings(make_parser().parse_args(["--quantization", "gptq"]), {"QUANTIZE": "awq"})


def test_quantize_of_a_method_the_checkpoint_lacks_fails_at_startup() -> None:
    result = subprocess.run([sys.executable, "-m", "pagedserve.cli", "serve"], capture_output=True, text=True,
                            env={**_clean_env(), "QUANTIZE": "gptq"}, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 2 and "needs a gptq checkpoint" in result.stderr

