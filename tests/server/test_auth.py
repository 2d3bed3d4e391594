"""--api-key: /v1 routes answer 401 (OpenAI body) without the key or with a wrong one, and
work with it through the openai client; /health stays open."""
from __future__ import annotations

import openai
import pytest
import requests

from tests.server.conftest import API_KEY


def test_api_key_required(auth_server) -> None:
    url = f"{auth_server.base_url}/v1/completions"
    body = {"model": "smol", "prompt": "Hello", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = requests.post(url, json=body, headers=headers, timeout=10)
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["type"] == "AuthenticationError" and error["code"] == 401 and error["message"]
    assert requests.get(f"{auth_server.base_url}/v1/models", timeout=10).status_code == 401
    assert requests.get(f"{auth_server.base_url}/health", timeout=10).status_code == 200

    ok = requests.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["model"] == "smol"


def test_openai_client_with_and_without_key(auth_server) -> None:
    good = openai.OpenAI(base_url=f"{auth_server.base_url}/v1", api_key=API_KEY, timeout=30, max_retries=0)
    result = good.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert result.choices[0].message.role == "assistant" and result.model == "smol"
    bad = openai.OpenAI(base_url=f"{auth_server.base_url}/v1", api_key="nope", timeout=30, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.parametrize("path, guarded", [
    ("/v1/embeddings", True), ("/v2/rerank", True), ("/score", True), ("/rerank", True), ("/classify", True),
    ("/embed", True), ("/predict", True), ("/tokenize", True), ("/debug/steps", True), ("/dashboard", True),
    ("/health", False), ("/metrics", False), ("/version", False), ("/info", False), ("/ping", False),
])
def test_every_route_that_runs_the_model_needs_the_key(path, guarded) -> None:
    """The embedding server's scoring routes (vLLM's and TEI's) are guarded like /v1's."""
    from pagedserve.server.middleware import needs_api_key
    assert needs_api_key(path) is guarded
