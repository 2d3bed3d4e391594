"""LoRA adapters through a real server process (--enable-lora --lora-modules) on the default model:
a request naming the adapter gets the offline engine's ids with that adapter (test_lora.py holds
those to transformers), the base name the base model's, side by side; /v1/models lists the adapter
under its parent; TGI's adapter_id selects it; an unknown name is a 404 naming `model`, an unknown
adapter_id a 422; a bad adapter stops the start with a clear error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
import requests
import torch
from safetensors.torch import save_file

from pagedserve import LLM, LoRARequest, SamplingParams
from tests.server.conftest import ServerProcess, serving

PROMPT = "The capital of France is"
ARGS = ("--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "128")


def write_default_model_adapter(path: str, seed: int = 0, scale: float = 0.2) -> str:
    """A random rank-8 adapter of SmolLM2-135M's q_proj and v_proj (hidden 576, 3 KV heads of 64)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(30):
        for name, out in (("q_proj", 576), ("v_proj", 192)):
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(8, 576, generator=generator) * scale
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, 8, generator=generator) * scale
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}, f)
    return path


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_default_model_adapter(str(tmp_path_factory.mktemp("smol_lora") / "a"))


@pytest.fixture(scope="module")
def expected(adapter: str) -> dict[str, str]:
    llm = LLM(enable_lora=True, dtype="float32", max_model_len=512, num_kv_blocks=128)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    try:
        lora = LoRARequest("smol-lora", 1, adapter)
        return {"base": llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].text,
                "smol-lora": llm.generate(PROMPT, params, lora_request=lora, use_tqdm=False)[0].outputs[0].text}
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory, adapter: str) -> Iterator[ServerProcess]:
    yield from serving(tmp_path_factory, "lora_server", *ARGS, "--served-model-name", "smol", "--enable-lora",
                       "--lora-modules", f"smol-lora={adapter}", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})


def test_adapter_and_base_side_by_side(lora_server, expected) -> None:
    assert expected["smol-lora"] != expected["base"]   # the adapter changes the output
    url = f"{lora_server.base_url}/v1/completions"
    texts: dict[str, list[str]] = {"smol": [], "smol-lora": []}

    def ask(model: str) -> None:
        for _ in range(3):
            body = requests.post(url, json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
                                 timeout=120).json()
            texts[model].append(body["choices"][0]["text"])

    threads = [threading.Thread(target=ask, args=(model,)) for model in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert texts == {"smol": [expected["base"]] * 3, "smol-lora": [expected["smol-lora"]] * 3}
    chat = requests.post(f"{lora_server.base_url}/v1/chat/completions", timeout=120, json={
        "model": "smol-lora", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert chat.status_code == 200 and chat.json()["model"] == "smol-lora"
    metrics = requests.get(f"{lora_server.base_url}/metrics", timeout=30).text
    assert 'pagedserve:lora_requests_info{max_lora="1",running_lora_adapters="",waiting_lora_adapters=""}' in metrics
    models = {m["id"]: m for m in requests.get(f"{lora_server.base_url}/v1/models", timeout=30).json()["data"]}
    assert models["smol-lora"]["parent"] == "smol" and models["smol-lora"]["root"].endswith("/a")
    missing = requests.post(url, json={"model": "other-lora", "prompt": PROMPT}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_tgi_adapter_id(lora_server, expected) -> None:
    url = f"{lora_server.base_url}/generate"
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "adapter_id": "smol-lora"}}
    assert requests.post(url, json=body, timeout=120).json()["generated_text"] == expected["smol-lora"]
    body["parameters"]["adapter_id"] = "nope"
    response = requests.post(url, json=body, timeout=30)
    assert response.status_code == 422 and "adapter_id" in response.json()["error"]


def test_a_bad_adapter_stops_the_start(tmp_path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    result = subprocess.run([sys.executable, "-m", "pagedserve.cli", "serve", "--enable-lora", "--lora-modules",
                             f"bad={tmp_path / 'bad'}", *ARGS], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "has no adapter_model.safetensors (parameter: lora_request)" in result.stderr


def test_runtime_load_and_unload(lora_server, adapter, expected, server) -> None:
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (VLLM_ALLOW_RUNTIME_LORA_UPDATING);
    a server without them answers 404."""
    base = lora_server.base_url
    loaded = requests.post(f"{base}/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": adapter},
                           timeout=60)
    assert loaded.status_code == 200 and "again" in loaded.text
    body = {"model": "again", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    assert requests.post(f"{base}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"] == \
        expected["smol-lora"]
    for bad, param in (({"lora_name": "again", "lora_path": adapter}, "lora_name"),
                       ({"lora_name": "x", "lora_path": "/nowhere"}, "lora_request"),
                       ({"lora_name": "x"}, "lora_path")):
        response = requests.post(f"{base}/v1/load_lora_adapter", json=bad, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert requests.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "again"}, timeout=30).status_code == 200
    assert requests.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 404
    gone = requests.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "again"}, timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "lora_name"
    assert requests.post(f"{server.base_url}/v1/load_lora_adapter", timeout=30,
                         json={"lora_name": "a", "lora_path": adapter}).status_code == 404


def test_bench_serve_names_adapters(lora_server, tmp_path) -> None:
    """`pagedserve bench serve --lora-modules` (vLLM's): each request names one of the adapters, at
    random; a name the server does not serve fails its requests (so the names reach the server)."""
    from pagedserve.cli import main as cli_main
    common = ["bench", "serve", "--base-url", lora_server.base_url, "--num-prompts", "8", "--random-input-len", "16",
              "--random-output-len", "4", "--ignore-eos", "--disable-tqdm", "--skip-initial-test"]
    assert cli_main([*common, "--lora-modules", "smol-lora", "smol", "--result-filename", str(tmp_path / "a.json")]) == 0
    (run,) = json.loads((tmp_path / "a.json").read_text())["runs"]
    assert run["metrics"]["completed"] == 8 and run["metrics"]["failed"] == 0
    assert cli_main([*common, "--lora-modules", "smol-lora", "no-such-lora", "--result-filename",
                     str(tmp_path / "b.json")]) == 0
    (run,) = json.loads((tmp_path / "b.json").read_text())["runs"]
    assert 0 < run["metrics"]["failed"] < 8 and run["metrics"]["completed"] == 8 - run["metrics"]["failed"]
