"""The scoring routes (server/score.py) through a real server process on a tiny random
cross-encoder with all-MiniLM's tokenizer: /v1/score and /score equal the offline LLM.score;
Jina / Cohere's /rerank, /v1/rerank and /v2/rerank sort by relevance and cut to top_n; TEI's /rerank
(a body with `texts`) gives scores or raw logits in TGI's shapes; bad input is a 4xx naming the
field while good requests run; the embedding routes answer a cross-encoder with a 400 naming model,
and a text-generation server answers the scoring routes so."""
from __future__ import annotations

import math
import threading
from typing import Iterator

import pytest
import requests

from pagedserve import LLM
from tests.models.test_score import DOCS, QUERY, write_cross_encoder
from tests.server.conftest import ServerProcess, serving


@pytest.fixture(scope="module")
def cross_folder(tmp_path_factory) -> str:
    return write_cross_encoder(str(tmp_path_factory.mktemp("cross_server") / "model"), seed=3)


@pytest.fixture(scope="module")
def reference(cross_folder) -> list[float]:
    llm = LLM(model=cross_folder)
    try:
        return [o.outputs.score for o in llm.score(QUERY, DOCS)]
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def score_server(tmp_path_factory, cross_folder) -> Iterator[ServerProcess]:
    yield from serving(tmp_path_factory, "score_server", cross_folder, "--served-model-name", "reranker")


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_score_and_rerank_routes(score_server, reference) -> None:
    base = score_server.base_url
    for path in ("/score", "/v1/score"):
        body = requests.post(f"{base}{path}", json={"model": "reranker", "text_1": QUERY, "text_2": DOCS},
                             timeout=60).json()
        assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["object"] == "list"
        assert _close([d["score"] for d in body["data"]], reference) and body["usage"]["prompt_tokens"] > 20
    best_first = sorted(range(3), key=lambda i: -reference[i])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        body = requests.post(f"{base}{path}", json={"query": QUERY, "documents": DOCS, "top_n": 2}, timeout=60).json()
        assert [r["index"] for r in body["results"]] == best_first[:2], path
        assert body["results"][0]["document"]["text"] == DOCS[best_first[0]]
        assert _close([r["relevance_score"] for r in body["results"]], [reference[i] for i in best_first[:2]])
    tei = requests.post(f"{base}/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True}, timeout=60).json()
    assert [r["index"] for r in tei] == best_first and tei[0]["text"] == DOCS[best_first[0]]
    raw = requests.post(f"{base}/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True}, timeout=60).json()
    assert _close([1 / (1 + math.exp(-r["score"])) for r in raw], [reference[i] for i in best_first])


def test_bad_input_names_the_field_while_good_requests_run(score_server, reference) -> None:
    base = score_server.base_url
    good: list[bool] = []

    def good_requests() -> None:
        for _ in range(8):
            body = requests.post(f"{base}/v1/score", json={"text_1": QUERY, "text_2": DOCS}, timeout=60).json()
            good.append(_close([d["score"] for d in body["data"]], reference))

    thread = threading.Thread(target=good_requests)
    thread.start()
    cases = [("/v1/score", {"text_1": [QUERY, QUERY], "text_2": DOCS}, "text_2"),
             ("/v1/score", {"text_1": [], "text_2": DOCS}, "text_1"),
             ("/v1/score", {"text_1": QUERY, "text_2": ["word " * 200]}, "text_2"),
             ("/v1/score", {"text_1": QUERY, "text_2": DOCS, "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
             ("/v1/score", {"text_1": QUERY, "text_2": DOCS, "priority": 1}, "priority"),
             ("/v1/score", {"text_1": QUERY, "text_2": ["x"] * 2049}, "text_2"),
             ("/v1/score", {"text_1": QUERY}, "text_2"),
             ("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": -1}, "top_n"),
             ("/v1/rerank", {"query": QUERY, "documents": []}, "documents"),
             ("/v1/rerank", {"query": 5, "documents": DOCS}, "query"),
             ("/v1/embeddings", {"input": "x"}, "model"),
             ("/v1/completions", {"prompt": "x"}, "model")]
    for path, body, param in cases:
        response = requests.post(f"{base}{path}", json=body, timeout=60)
        assert response.status_code == 400, (path, body, response.text)
        assert response.json()["error"]["param"] == param, (path, body, response.text)
    tei = requests.post(f"{base}/rerank", json={"query": QUERY, "texts": []}, timeout=60)
    assert tei.status_code == 422 and tei.json()["error_type"] == "validation" and "texts" in tei.json()["error"]
    unknown = requests.post(f"{base}/v1/score", json={"model": "x", "text_1": QUERY, "text_2": DOCS}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    thread.join(120)
    assert good == [True] * 8


def test_a_text_generation_server_refuses_scores(server) -> None:
    for path in ("/v1/score", "/rerank", "/v2/rerank", "/classify"):
        response = requests.post(f"{server.base_url}{path}", json={"text_1": "a", "text_2": "b"}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == "model", path


def test_classify_and_tei_predict(tmp_path_factory) -> None:
    """vLLM's /classify and TEI's /predict on a three-label classifier: the offline probabilities,
    the best label first in TEI's answer; score routes refuse it naming model."""
    labels = ["negative", "neutral", "positive"]
    folder = write_cross_encoder(str(tmp_path_factory.mktemp("classifier") / "model"), seed=5, labels=labels)
    llm = LLM(model=folder, dtype="float32")
    try:
        reference = [o.outputs.probs for o in llm.classify(DOCS)]
    finally:
        llm.shutdown()
    for proc in serving(tmp_path_factory, "classify_server", folder, "--dtype", "float32"):
        body = requests.post(f"{proc.base_url}/classify", json={"input": DOCS}, timeout=60).json()
        assert [d["num_classes"] for d in body["data"]] == [3, 3, 3]
        assert all(_close(d["probs"], ref) for d, ref in zip(body["data"], reference))
        assert [d["label"] for d in body["data"]] == [labels[max(range(3), key=ref.__getitem__)] for ref in reference]
        one = requests.post(f"{proc.base_url}/predict", json={"inputs": DOCS[0]}, timeout=60).json()
        assert [p["label"] for p in one] == sorted(labels, key=lambda label: -reference[0][labels.index(label)])
        assert _close([p["score"] for p in one], sorted(reference[0], reverse=True))
        assert len(requests.post(f"{proc.base_url}/predict", json={"inputs": DOCS}, timeout=60).json()) == 3
        refused = requests.post(f"{proc.base_url}/v1/score", json={"text_1": QUERY, "text_2": DOCS}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "model"
        empty = requests.post(f"{proc.base_url}/classify", json={"input": []}, timeout=60)
        assert empty.status_code == 400 and empty.json()["error"]["param"] == "input"
