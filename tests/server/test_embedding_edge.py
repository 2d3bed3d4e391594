"""An embedding model's server at its edges (server/embeddings.py, server/score.py): a client that
leaves stops its request (queue, admission, shutdown); /tokenize and /detokenize are the generating
server's (vLLM's: any length counted, strict bodies); scores and classes count in /metrics, their
usage as vLLM counts it, and a text too long is named by its own field."""
from __future__ import annotations

import json
import socket
import time
from typing import Callable, Iterator

import pytest
import requests

from tests.helpers import minilm_path
from tests.models.test_score import DOCS, QUERY, write_cross_encoder
from tests.server.conftest import ServerProcess, scrape_metrics, serving

LONG = "word " * 300   # 302 tokens: over MiniLM's 256 and the tiny cross-encoder's 128


@pytest.fixture(scope="module")
def minilm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serving(tmp_path_factory, "edge_minilm", minilm_path(), "--served-model-name", "minilm")


def _metric(samples: dict, name: str, model: str) -> float:
    return samples.get((name, (("model_name", model),)), 0.0)


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what}")
        time.sleep(0.05)


def _param(response: requests.Response) -> str | None:
    return response.json()["error"]["param"]


def test_a_client_that_leaves_stops_its_request(tmp_path_factory) -> None:
    """2,048 inputs whose client leaves once they queue (embeddings; scores through /invocations;
    Jina's /rerank): the queue empties at once rather than being embedded for nobody, their
    admission is given back (the server admits 2,048 + 8 inputs: 16 more would be a 503 while
    the 2,048 were held), a small request answers, and SIGTERM finds nothing to cancel."""
    text = "the quick brown fox jumps over the lazy dog " * 6
    texts = [f"{text}{i}" for i in range(2048)]
    for proc in serving(tmp_path_factory, "edge_leaving", minilm_path(), "--served-model-name", "minilm",
                        "--max-num-seqs", "8", "--max-waiting-requests", "0"):
        def waiting() -> float:
            return _metric(scrape_metrics(proc.base_url), "pagedserve:num_requests_waiting", "minilm")

        for path, body in [("/v1/embeddings", {"input": texts}),
                           ("/invocations", {"text_1": "a question", "text_2": texts}),
                           ("/rerank", {"query": "a question", "documents": texts})]:
            data = json.dumps(body).encode()
            with socket.create_connection(("127.0.0.1", proc.port)) as sock:
                sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
                _wait_for(lambda: waiting() > 1000, 60, f"{path}'s inputs queued")
            _wait_for(lambda: waiting() == 0, 3, f"{path}'s queue empty 3 s after its client left")
            held = requests.post(f"{proc.base_url}/v1/embeddings", json={"input": ["x"] * 16}, timeout=30)
            assert held.status_code == 200, (path, held.text)
            # (the queue is empty: nothing of the client that left is ahead of this request)
            small = requests.post(f"{proc.base_url}/v1/embeddings", json={"input": "hi"}, timeout=30)
            assert small.status_code == 200, path
    log = proc.log_tail(20000)
    for bad in ("Traceback", "ERROR", "CancelledError"):
        assert bad not in log, log[-4000:]


def test_tokenize_and_detokenize_as_the_generating_server(minilm_server) -> None:
    """vLLM's /tokenize counts a prompt of any length (max_model_len beside it) and its bodies are
    strict; /detokenize exists; messages render through a chat template; TGI's `inputs` shape."""
    url = minilm_server.base_url
    long = requests.post(f"{url}/tokenize", json={"prompt": LONG, "return_token_strs": True}, timeout=30)
    assert long.status_code == 200, long.text
    body = long.json()
    assert body["count"] == len(body["tokens"]) == 302 and body["max_model_len"] == 256
    assert body["token_strs"][:2] == ["[CLS]", "word"] and len(body["token_strs"]) == 302
    bare = requests.post(f"{url}/tokenize", json={"prompt": "Hello world", "add_special_tokens": False},
                         timeout=30).json()
    assert bare["tokens"] == [7592, 2088] and bare["count"] == 2 and bare["token_strs"] is None
    detokenized = requests.post(f"{url}/detokenize", json={"tokens": bare["tokens"], "model": "minilm"}, timeout=30)
    assert detokenized.status_code == 200 and detokenized.json() == {"prompt": "hello world"}, detokenized.text
    chat = requests.post(f"{url}/tokenize", timeout=30, json={
        "messages": [{"role": "user", "content": "Hello world"}],
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}).json()
    assert chat["tokens"] == bare["tokens"]   # a rendered template's text: no special tokens added
    tgi = requests.post(f"{url}/tokenize", json={"inputs": "Hello world"}, timeout=30).json()
    assert [(t["id"], t["text"]) for t in tgi] == [(101, ""), (7592, "Hello"), (2088, "world"), (102, "")]
    for path, body, status, param in [("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, 400,
                                       "add_special_tokens"),
                                      ("/tokenize", {"prompt": "x", "made_up": 1}, 400, "made_up"),
                                      ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
                                      ("/detokenize", {"tokens": [10**6]}, 400, "tokens"),
                                      ("/detokenize", {"tokens": "x"}, 400, "tokens")]:
        response = requests.post(f"{url}{path}", json=body, timeout=30)
        assert response.status_code == status and _param(response) == param, (path, body, response.text)


def test_embedding_model_scores_count_in_metrics_and_usage_as_vllm(minilm_server) -> None:
    """vLLM's usage of an embedding model's score: each pair's two texts and the pad token it joins
    them with (a text shared by pairs counts in each; it runs once); /metrics counts each request
    and the tokens run. A text too long is named by its own field."""
    url = minilm_server.base_url

    def count(text: str) -> int:
        return requests.post(f"{url}/tokenize", json={"prompt": text}, timeout=30).json()["count"]

    docs = ["a", "Hello world", ""]
    pairs_tokens = sum(count("Hello world") + 1 + count(doc) for doc in docs)
    run_tokens = count("Hello world") + count("a") + count("")   # the distinct texts
    before = scrape_metrics(url)
    score = requests.post(f"{url}/score", json={"text_1": "Hello world", "text_2": docs}, timeout=30).json()
    assert score["usage"] == {"prompt_tokens": pairs_tokens, "total_tokens": pairs_tokens}, score
    rerank = requests.post(f"{url}/v1/rerank", json={"query": "Hello world", "documents": docs}, timeout=30).json()
    assert rerank["usage"] == {"total_tokens": pairs_tokens}, rerank
    empty = requests.post(f"{url}/v1/score", json={"text_1": "", "text_2": ""}, timeout=30).json()
    assert empty["usage"]["prompt_tokens"] == 5   # [CLS] [SEP], the pad, [CLS] [SEP]
    after = scrape_metrics(url)
    for name, grown in [("pagedserve:request_success_total", 3),
                        ("pagedserve:prompt_tokens_total", 2 * run_tokens + count(""))]:
        assert _metric(after, name, "minilm") - _metric(before, name, "minilm") == grown, name
    for path, body, param in [("/score", {"text_1": LONG, "text_2": "x"}, "text_1"),
                              ("/score", {"text_1": "x", "text_2": ["y", LONG]}, "text_2"),
                              ("/v1/rerank", {"query": LONG, "documents": ["x"]}, "query"),
                              ("/v1/rerank", {"query": "x", "documents": [LONG]}, "documents")]:
        response = requests.post(f"{url}{path}", json=body, timeout=30)
        assert response.status_code == 400 and _param(response) == param, (path, response.text)


def test_cross_encoder_scores_and_classes_count_and_name_their_fields(tmp_path_factory) -> None:
    """On a cross-encoder: /score, both /rerank bodies, /classify and TEI's /predict each count in
    /metrics with the tokens they ran (a score's usage: its pairs' tokens, as vLLM's); a pair too
    long names the field of its longer text."""
    folder = write_cross_encoder(str(tmp_path_factory.mktemp("edge_cross") / "model"), seed=3)
    for proc in serving(tmp_path_factory, "edge_cross_server", folder, "--served-model-name", "reranker"):
        url = proc.base_url

        def count(text: str) -> int:
            return requests.post(f"{url}/tokenize", json={"prompt": text}, timeout=30).json()["count"]

        pair_tokens = sum(count(QUERY) + count(doc) - 1 for doc in DOCS)   # [CLS] query [SEP] doc [SEP]
        doc_tokens = sum(count(doc) for doc in DOCS)
        before = scrape_metrics(url)
        score = requests.post(f"{url}/score", json={"text_1": QUERY, "text_2": DOCS}, timeout=30).json()
        assert score["usage"]["prompt_tokens"] == pair_tokens, score
        for body in ({"query": QUERY, "documents": DOCS}, {"query": QUERY, "texts": DOCS}):
            assert requests.post(f"{url}/rerank", json=body, timeout=30).status_code == 200
        classes = requests.post(f"{url}/classify", json={"input": DOCS}, timeout=30).json()
        assert classes["usage"]["prompt_tokens"] == doc_tokens, classes
        assert requests.post(f"{url}/predict", json={"inputs": DOCS}, timeout=30).status_code == 200
        after = scrape_metrics(url)
        for name, grown in [("pagedserve:request_success_total", 5),
                            ("pagedserve:prompt_tokens_total", 3 * pair_tokens + 2 * doc_tokens)]:
            assert _metric(after, name, "reranker") - _metric(before, name, "reranker") == grown, name
        for path, body, param in [("/score", {"text_1": LONG, "text_2": DOCS}, "text_1"),
                                  ("/v1/score", {"text_1": QUERY, "text_2": [DOCS[0], LONG]}, "text_2"),
                                  ("/v2/rerank", {"query": LONG, "documents": DOCS}, "query")]:
            response = requests.post(f"{url}{path}", json=body, timeout=30)
            assert response.status_code == 400 and _param(response) == param, (path, response.text)
        tei = requests.post(f"{url}/rerank", json={"query": LONG, "texts": DOCS}, timeout=30)
        assert tei.status_code == 422 and "query" in tei.json()["error"] and '"truncate": true' in tei.json()["error"]
