"""/v1/embeddings through a real server process on all-MiniLM-L6-v2 (server/embeddings.py), with
OpenAI's own client: the offline LLM.embed's vectors, float and base64; bad input is a 400
naming the field while good requests run; the text-generation routes answer an embedding
server with a 400 naming `model`, and the generative `server` answers /v1/embeddings so. A
decoder under --runner pooling (Qwen3-Embedding's layout) serves the offline vectors too."""
from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import threading
from typing import Iterator

import pytest
import requests
from openai import OpenAI

from pagedserve import LLM
from tests.helpers import minilm_path, write_backbone
from tests.server.conftest import ServerProcess, serving

TEXTS = ["Hello world", "Paged attention stores the KV cache in blocks.", "a"]


@pytest.fixture(scope="module")
def embed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serving(tmp_path_factory, "embed_server", minilm_path(), "--served-model-name", "minilm")


@pytest.fixture(scope="module")
def reference() -> list[list[float]]:
    llm = LLM(model=minilm_path())
    try:
        return [o.outputs.embedding for o in llm.embed(TEXTS)]
    finally:
        llm.shutdown()


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_openai_client_gets_the_offline_vectors(embed_server, reference) -> None:
    client = OpenAI(base_url=f"{embed_server.base_url}/v1", api_key="none")
    result = client.embeddings.create(model="minilm", input=TEXTS)   # the client asks for base64 and decodes it
    assert [d.index for d in result.data] == [0, 1, 2]
    assert all(_close(d.embedding, ref) for d, ref in zip(result.data, reference))
    assert result.usage.prompt_tokens == result.usage.total_tokens > len(TEXTS) * 2
    floats = client.embeddings.create(model="minilm", input=TEXTS[1], encoding_format="float")
    assert _close(floats.data[0].embedding, reference[1])
    raw = requests.post(f"{embed_server.base_url}/v1/embeddings", timeout=30,
                        json={"input": [TEXTS[2]], "encoding_format": "base64"}).json()
    decoded = list(struct.unpack("<384f", base64.b64decode(raw["data"][0]["embedding"])))
    assert _close(decoded, reference[2]) and raw["model"] == "minilm" and raw["object"] == "list"
    ids = requests.post(f"{embed_server.base_url}/tokenize", json={"prompt": TEXTS[0]}, timeout=30).json()["tokens"]
    by_ids = requests.post(f"{embed_server.base_url}/v1/embeddings", json={"input": ids}, timeout=30).json()
    assert _close(by_ids["data"][0]["embedding"], reference[0])
    models = requests.get(f"{embed_server.base_url}/v1/models", timeout=30).json()
    assert models["data"][0]["id"] == "minilm" and models["data"][0]["max_model_len"] == 256
    metrics = requests.get(f"{embed_server.base_url}/metrics", timeout=30).text
    assert 'pagedserve:request_success_total{model_name="minilm"}' in metrics


def test_bad_input_is_a_400_naming_the_field_while_good_requests_run(embed_server, reference) -> None:
    url = f"{embed_server.base_url}/v1/embeddings"
    good: list[bool] = []

    def good_requests() -> None:
        for _ in range(10):
            body = requests.post(url, json={"input": TEXTS}, timeout=60).json()
            good.append(all(_close(d["embedding"], r) for d, r in zip(body["data"], reference)))

    thread = threading.Thread(target=good_requests)
    thread.start()
    cases = [({"input": []}, "input"), ({"input": "x", "dimensions": 128}, "dimensions"),
             ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
             ({"input": "word " * 300}, "input"), ({"input": [[5, 10**6]]}, "input"),
             ({"input": ["x"] * 2049}, "input"),
             ({"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
             ({"input": "x", "priority": 1}, "priority"), ({"input": "x", "made_up": 1}, "made_up"),
             ({"input": 5}, "input"), ({}, "input")]
    for body, param in cases:
        response = requests.post(url, json=body, timeout=60)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param, (body, response.text)
    unknown = requests.post(url, json={"input": "x", "model": "other"}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    cut = requests.post(url, json={"input": "word " * 300, "truncate_prompt_tokens": 16}, timeout=30)
    assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == 16, cut.text
    for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
        response = requests.post(f"{embed_server.base_url}{path}", json={"prompt": "x"}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == "model", path
    thread.join(120)
    assert good == [True] * 10


def test_a_text_generation_server_refuses_embeddings(server) -> None:
    response = requests.post(f"{server.base_url}/v1/embeddings", json={"input": "x"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"


def test_tei_embed_route(embed_server, reference) -> None:
    """text-embeddings-inference's POST /embed: an array of vectors; normalize false gives the
    raw mean (whose normalisation is the reference); errors in TGI's body with 422."""
    url = f"{embed_server.base_url}/embed"
    vectors = requests.post(url, json={"inputs": TEXTS}, timeout=30).json()
    assert all(_close(v, r) for v, r in zip(vectors, reference))
    [raw] = requests.post(url, json={"inputs": TEXTS[0], "normalize": False}, timeout=30).json()
    norm = sum(x * x for x in raw) ** 0.5
    assert abs(norm - 1) > 1e-3 and _close([x / norm for x in raw], reference[0])
    assert len(requests.post(url, json={"inputs": "word " * 300, "truncate": True}, timeout=30).json()) == 1
    for body, param in [({"inputs": "word " * 300}, '"truncate": true'),
                        ({"inputs": "x", "prompt_name": "query"}, "prompt_name"),
                        ({"inputs": "x", "truncation_direction": "left"}, "truncation_direction"),
                        ({"inputs": []}, "inputs")]:
        response = requests.post(url, json=body, timeout=30)
        assert response.status_code == 422 and response.json()["error_type"] == "validation", (body, response.text)
        assert param in response.json()["error"], (body, response.text)   # TGI's body names no param: the text does


def test_truncation_holds_while_other_requests_tokenize(embed_server) -> None:
    """A fast tokenizer's truncation is state set per call: under concurrent requests a cut request's
    truncation was reset by another's call before it encoded (a 400 "a prompt has 302 tokens").
    Eight threads mix cut and uncut requests: every one is a 200, the cut ones at 16 tokens."""
    url, failures = f"{embed_server.base_url}/v1/embeddings", []

    def send(thread: int) -> None:
        for _ in range(8):
            cut = thread % 2 == 1
            body = {"input": "word " * 300, "truncate_prompt_tokens": 16} if cut else {"input": TEXTS}
            response = requests.post(url, json=body, timeout=60)
            if response.status_code != 200 or (cut and response.json()["usage"]["prompt_tokens"] != 16):
                failures.append((thread, response.status_code, response.text[:200]))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures[:3]


def test_a_15_mb_input_is_refused_at_once_and_a_plain_one_beside_it_is_answered(embed_server, reference) -> None:
    """A 15 MB text (~3M tokens for a 256-token model) is refused from a prefix's tokens
    (prompt_bound.PromptLengthBound), not after tokenizing it whole (~12 s of a tokenizing
    thread each): /v1/embeddings a 400 naming input, TEI's /embed a 422 naming "truncate": true;
    a plain request sent beside them gets its vector."""
    text = "the capital of France is Paris " * (15_000_000 // 31)
    bodies = {"/v1/embeddings": json.dumps({"model": "minilm", "input": text}).encode(),
              "/embed": json.dumps({"inputs": text}).encode()}
    results: dict[str, requests.Response] = {}

    def send(path: str) -> None:
        results[path] = requests.post(f"{embed_server.base_url}{path}", data=bodies[path],
                                      headers={"Content-Type": "application/json"}, timeout=120)

    threads = [threading.Thread(target=send, args=(path,), daemon=True) for path in bodies]
    for thread in threads:
        thread.start()
    plain = requests.post(f"{embed_server.base_url}/v1/embeddings", json={"model": "minilm", "input": TEXTS[0]},
                          timeout=60)
    for thread in threads:
        thread.join(120)
    assert plain.status_code == 200 and _close(plain.json()["data"][0]["embedding"], reference[0]), plain.text
    openai, tei = results["/v1/embeddings"], results["/embed"]
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "input", openai.text[:500]
    assert "maximum context length is 256 tokens; a prompt has at least" in openai.json()["error"]["message"]
    assert tei.status_code == 422 and '"truncate": true' in tei.json()["error"], tei.text[:500]


def test_invocations_and_ping_on_an_embedding_server(embed_server, reference) -> None:
    """SageMaker's /invocations answers each body as the route its fields name (`input`: vLLM's
    embeddings, `inputs`: TEI's /embed, `text_1`: /score); /ping is /health."""
    url = embed_server.base_url
    assert requests.get(f"{url}/ping", timeout=10).status_code == 200
    openai = requests.post(f"{url}/invocations", json={"input": TEXTS}, timeout=30).json()
    assert all(_close(d["embedding"], r) for d, r in zip(openai["data"], reference))
    assert all(_close(v, r) for v, r in zip(requests.post(f"{url}/invocations", json={"inputs": TEXTS},
                                                          timeout=30).json(), reference))
    pair = {"text_1": TEXTS[0], "text_2": TEXTS[1]}
    assert requests.post(f"{url}/invocations", json=pair, timeout=30).json()["data"] == \
        requests.post(f"{url}/score", json=pair, timeout=30).json()["data"]
    refused = requests.post(f"{url}/invocations", json={"messages": []}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "body"
    schema = requests.get(f"{url}/openapi.json", timeout=30).json()   # the bodies and /invocations documented
    body = schema["paths"]["/invocations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert [r["$ref"].rsplit("/", 1)[1] for r in body["oneOf"]] == ["EmbeddingRequest", "EmbedRequest",
                                                                    "ScoreRequest", "RerankRequest"]
    embed = schema["paths"]["/embed"]["post"]
    assert embed["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/EmbedRequest")
    assert embed["responses"]["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/TGIErrorBody")
    assert "input" in schema["components"]["schemas"]["EmbeddingRequest"]["properties"]


ODD = [None, -1, 0, 2**64, 1e308, 0.5, "", "x" * 3000, "\u0000", "\ud800", [], [-1], [2**40], [""], [[]], [[1, 2]],
       [None], [{}], {}, {"a": 1}, True, "float", "base64", 384, -2, 1, [101, 102], ["a", 5]]
FIELDS = {"/v1/embeddings": ({"input": "Hi"}, ["input", "model", "encoding_format", "dimensions", "user",
                                               "truncate_prompt_tokens", "add_special_tokens", "request_id", "priority"]),
          "/embed": ({"inputs": "Hi"}, ["inputs", "normalize", "truncate", "truncation_direction", "prompt_name",
                                        "dimensions"]),
          "/v1/score": ({"text_1": "Hi", "text_2": ["a", "b"]}, ["text_1", "text_2", "model", "truncate_prompt_tokens",
                                                                "request_id", "priority"]),
          "/v1/rerank": ({"query": "Hi", "documents": ["a", "b"]}, ["query", "documents", "top_n", "return_documents",
                                                                    "truncate_prompt_tokens", "model"]),
          "/rerank": ({"query": "Hi", "texts": ["a"]}, ["query", "texts", "raw_scores", "return_text", "truncate",
                                                        "truncation_direction"])}
TEI_PATHS = ("/embed", "/rerank")   # TGI's error body (their bodies here are TEI's)


def test_random_odd_bodies_never_get_a_5xx(embed_server, reference) -> None:
    """250 seeded bodies with one to three fields set to odd values (embeddings, scores, reranks),
    from two threads while good requests run: a 200, or a 4xx that names what is wrong (OpenAI's
    `param`, TEI's message)."""
    import json
    import random
    from concurrent.futures import ThreadPoolExecutor
    rng = random.Random(37)
    cases = []
    for _ in range(250):
        path = rng.choice(sorted(FIELDS))
        base, fields = FIELDS[path]
        body = dict(base)
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(fields)] = rng.choice(ODD)
        cases.append((path, body))
    good: list[bool] = []

    def good_requests() -> None:
        for _ in range(8):
            data = requests.post(f"{embed_server.base_url}/v1/embeddings", json={"input": TEXTS}, timeout=60).json()
            good.append(all(_close(d["embedding"], r) for d, r in zip(data["data"], reference)))

    def send(case: tuple[str, dict]) -> requests.Response:
        path, body = case
        data = json.dumps(body, allow_nan=True).encode()
        return requests.post(f"{embed_server.base_url}{path}", data=data, timeout=60,
                             headers={"content-type": "application/json"})

    thread = threading.Thread(target=good_requests)
    thread.start()
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(send, cases))
    thread.join(120)
    assert good == [True] * 8
    for (path, body), response in zip(cases, answers):
        assert response.status_code < 500, (path, body, response.text)
        if response.status_code >= 400:
            error = response.json()
            if path in TEI_PATHS:
                assert error["error_type"] == "validation" and error["error"], (body, error)
            else:
                assert error["error"]["param"], (body, error)
    assert {200, 400, 422} <= {r.status_code for r in answers}


@pytest.fixture(scope="module")
def decoder_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Qwen3 backbone in Qwen3-Embedding's layout (last token, normalised) with
    all-MiniLM's tokenizer (its vocabulary: 30,522 ids)."""
    path = write_backbone(str(tmp_path_factory.mktemp("qwen3_embed")), "qwen3", "Qwen3ForCausalLM",
                          pooling="lasttoken", vocab_size=30522, max_position_embeddings=128,
                          matryoshka_dimensions=[16, 32, 64])   # a Matryoshka model (Qwen3-Embedding is one)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(os.path.join(minilm_path(), name), path)
    return path


def test_a_decoder_under_runner_pooling_serves_the_offline_vectors(tmp_path_factory, decoder_folder) -> None:
    llm = LLM(model=decoder_folder, runner="pooling")
    try:
        reference = [o.outputs.embedding for o in llm.embed(TEXTS)]
    finally:
        llm.shutdown()
    for proc in serving(tmp_path_factory, "decoder_embed_server", decoder_folder, "--runner", "pooling",
                        "--served-model-name", "qwen3-embed"):
        client = OpenAI(base_url=f"{proc.base_url}/v1", api_key="none")
        result = client.embeddings.create(model="qwen3-embed", input=TEXTS)
        assert all(_close(d.embedding, ref) for d, ref in zip(result.data, reference))
        assert len(result.data[0].embedding) == 64
        too_long = requests.post(f"{proc.base_url}/v1/embeddings", json={"input": "word " * 200}, timeout=30)
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "input"
        chat = requests.post(f"{proc.base_url}/v1/chat/completions", timeout=30,
                             json={"messages": [{"role": "user", "content": "x"}]})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "model"
        # Matryoshka: the first 16 entries, normalised again; sizes outside the config's list are refused
        short = client.embeddings.create(model="qwen3-embed", input=TEXTS[0], dimensions=16).data[0].embedding
        head = reference[0][:16]
        norm = sum(x * x for x in head) ** 0.5
        assert _close(short, [x / norm for x in head])
        for bad in (20, 128):
            response = requests.post(f"{proc.base_url}/v1/embeddings", json={"input": "x", "dimensions": bad},
                                     timeout=30)
            assert response.status_code == 400 and response.json()["error"]["param"] == "dimensions"
