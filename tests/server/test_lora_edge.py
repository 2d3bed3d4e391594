"""LoRA adapters' edges through a real server process (--enable-lora, one device slot, four kept
on the host, runtime loading on): an adapter_config.json with bad values is a 400 naming
lora_request (and stops a start with the one-line error, exit 2), as is a corrupt adapter, while
the requests running meanwhile go on untouched; the names `model` resolves before adapters are
refused as adapter names; two loads at once each get the name (or a 400) and an id of their own;
an adapter whose files go away after loading runs as before (read once, when loaded), and only
once dropped from the host cache does a request for it get a 400, alone."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from tests.server.conftest import ServerProcess, free_port, serving
from tests.server.test_lora_server import write_default_model_adapter

ARGS = ("--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "128")
PROMPT = "The capital of France is"
CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lora_edge_adapters")
    return {name: write_default_model_adapter(str(root / name), seed=seed) for seed, name in enumerate("abc")}


@pytest.fixture(scope="module")
def lora_edge(tmp_path_factory: pytest.TempPathFactory, adapters) -> Iterator[ServerProcess]:
    env = {k: v for k, v in os.environ.items() if k != "PAGEDSERVE_API_KEY"} | {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    yield from serving(tmp_path_factory, "lora_edge", *ARGS, "--served-model-name", "smol", "smol-alias",
                       "--enable-lora", "--max-loras", "1", "--max-cpu-loras", "4", "--lora-modules",
                       f"a={adapters['a']}", env=env)


def _load(base: str, name: str, path: str) -> requests.Response:
    return requests.post(f"{base}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=120)


def _complete(base: str, model: str) -> requests.Response:
    return requests.post(f"{base}/v1/completions", timeout=120,
                         json={"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0})


def _text(base: str, model: str) -> str:
    response = _complete(base, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _models(base: str) -> dict[str, dict]:
    return {m["id"]: m for m in requests.get(f"{base}/v1/models", timeout=30).json()["data"]}


def _with_config(good: str, path: Path, **changes) -> str:
    path.mkdir()
    shutil.copy(os.path.join(good, "adapter_model.safetensors"), path)
    (path / "adapter_config.json").write_text(json.dumps(CONFIG | changes))
    return str(path)


def test_bad_config_values_are_400s(lora_edge, adapters, tmp_path) -> None:
    base = lora_edge.base_url
    cases = [(_with_config(adapters["a"], tmp_path / "alpha_str", lora_alpha="16"), "lora_alpha"),
             (_with_config(adapters["a"], tmp_path / "alpha_null", lora_alpha=None), "lora_alpha"),
             (_with_config(adapters["a"], tmp_path / "pattern", alpha_pattern={"(": 4}), "alpha_pattern")]
    rank0 = _with_config(adapters["a"], tmp_path / "rank0")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": torch.zeros(0, 576), f"{key}.lora_B.weight": torch.zeros(576, 0)},
              os.path.join(rank0, "adapter_model.safetensors"))
    cases.append((rank0, "rank 0"))
    for i, (path, words) in enumerate(cases):
        response = _load(base, f"bad{i}", path)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "lora_request" and words in error["message"], error
    assert not [name for name in _models(base) if name.startswith("bad")]
    assert _load(base, "bad0", adapters["b"]).status_code == 200   # a refused load leaves its name free


def test_names_model_resolves_first_are_refused(lora_edge, adapters) -> None:
    """`model` "tgi" / "dummy" (TGI clients' placeholders) and the served names run the base
    model: an adapter named so would load and never run."""
    for name in ("tgi", "dummy", "smol", "smol-alias"):
        response = _load(lora_edge.base_url, name, adapters["b"])
        assert response.status_code == 400 and response.json()["error"]["param"] == "lora_name", response.text
        assert "reserved" in response.json()["error"]["message"]
    assert {"tgi", "dummy"}.isdisjoint(_models(lora_edge.base_url))


def test_concurrent_loads_take_a_name_and_an_id_each(lora_edge, adapters, tmp_path) -> None:
    """While one load's check reads the folder (held here: its adapter_config.json is a FIFO),
    a load of another name gets an id of its own and one of the same name is refused."""
    base = lora_edge.base_url
    slow = tmp_path / "slow"
    slow.mkdir()
    shutil.copy(os.path.join(adapters["a"], "adapter_model.safetensors"), slow)
    fifo = slow / "adapter_config.json"
    os.mkfifo(fifo)
    results: dict[str, requests.Response] = {}
    first = threading.Thread(target=lambda: results.setdefault("first", _load(base, "race", str(slow))))
    first.start()
    deadline = time.monotonic() + 60
    while True:   # a FIFO opens for writing, without blocking, once its reader (the check) has it open
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            assert exc.errno == errno.ENXIO and time.monotonic() < deadline, exc
            time.sleep(0.02)
    try:
        other = _load(base, "other", adapters["b"])
        second = _load(base, "race", adapters["c"])
        os.write(fd, json.dumps(CONFIG).encode())
    finally:
        os.close(fd)
    first.join(60)
    os.remove(fifo)   # a plain file again: an adapter dropped from the host cache is read again
    fifo.write_text(json.dumps(CONFIG))
    assert results["first"].status_code == 200 and other.status_code == 200, (results["first"].text, other.text)
    assert second.status_code == 400 and second.json()["error"]["param"] == "lora_name", second.text
    assert "already been loaded" in second.json()["error"]["message"]
    assert _models(base)["race"]["root"] == str(slow)
    race, other_text = _text(base, "race"), _text(base, "other")
    assert race == _text(base, "a") and other_text != race   # "race" runs a's weights, "other" b's


def test_adapter_files_gone_after_loading(lora_edge, adapters, tmp_path) -> None:
    """An adapter is read whole when it is loaded: its folder deleted afterwards, it runs as before
    (copied back into the one device slot from the host cache after another adapter took it).
    Dropped from the host cache (four adapters loaded since), it is read again when a request
    names it: that request alone gets a 400 naming lora_request."""
    base = lora_edge.base_url
    gone, twin = tmp_path / "gone", tmp_path / "twin"
    shutil.copytree(adapters["c"], gone)
    shutil.copytree(adapters["c"], twin)
    assert _load(base, "gone", str(gone)).status_code == 200
    assert _load(base, "twin", str(twin)).status_code == 200
    shutil.rmtree(gone)
    text = _text(base, "gone")
    a_text = _text(base, "a")   # the one slot now holds a
    assert _text(base, "gone") == text == _text(base, "twin") and text != a_text
    for i in range(4):
        assert _load(base, f"push{i}", adapters["b"]).status_code == 200
    response = _complete(base, "gone")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "lora_request" and "LoRA adapter 'gone': cannot read" in error["message"], error
    assert _text(base, "a") == a_text and _text(base, "twin") == text


def test_a_corrupt_adapter_is_a_400_and_running_requests_go_on(lora_edge, adapters, tmp_path) -> None:
    """A NaN in an adapter's factors (in a device slot it would turn every token of a step that
    runs any adapter into NaN) and a weights file that is not safetensors are refused when loaded,
    a 400 naming lora_request and the adapter; a base-model request running meanwhile gets the
    text it gets alone."""
    base = lora_edge.base_url
    nan, garbage = tmp_path / "nan", tmp_path / "garbage"
    for folder in (nan, garbage):
        shutil.copytree(adapters["a"], folder)
    tensors = load_file(nan / "adapter_model.safetensors")
    tensors[next(key for key in sorted(tensors) if "lora_B" in key)][0, 0] = float("nan")
    save_file(tensors, nan / "adapter_model.safetensors")
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    body = {"model": "smol", "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    url = f"{base}/v1/completions"
    alone = requests.post(url, json=body, timeout=120).json()["choices"][0]["text"]
    meanwhile: dict[str, requests.Response] = {}
    running = threading.Thread(target=lambda: meanwhile.setdefault("base", requests.post(url, json=body, timeout=120)))
    running.start()
    for name, folder in (("nan", nan), ("garbage", garbage)):
        response = _load(base, name, str(folder))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "lora_request" and f"LoRA adapter '{name}'" in error["message"], error
    assert _complete(base, "nan").status_code == 404   # never served
    running.join(120)
    assert meanwhile["base"].status_code == 200 and meanwhile["base"].json()["choices"][0]["text"] == alone


def test_start_up_refusals_are_one_line(adapters, tmp_path) -> None:
    """--lora-modules: a reserved name, and an adapter with a bad config value, stop the start
    with one line and exit 2 (no traceback)."""
    bad = _with_config(adapters["a"], tmp_path / "bad", lora_alpha="16")
    for modules, words in (([f"tgi={adapters['a']}"], "is reserved"), ([f"bad={bad}"], "lora_alpha")):
        command = [sys.executable, "-m", "pagedserve.cli", "serve", "--enable-lora", "--lora-modules", *modules, *ARGS,
                   "--port", str(free_port())]
        result = subprocess.run(command, capture_output=True, text=True, timeout=180,
                                cwd=Path(__file__).resolve().parents[2])
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert words in result.stderr, result.stderr[-2000:]


def test_an_adapter_unloaded_mid_request_keeps_its_name_in_the_response(lora_edge, adapters) -> None:
    """A streamed completion with an adapter keeps the adapter's name as its `model` in every chunk
    after the adapter is unloaded mid-stream (the response named the served model once the
    registry no longer knew the name)."""
    base = lora_edge.base_url
    assert _load(base, "leaving", adapters["b"]).status_code == 200
    models = []
    with requests.post(f"{base}/v1/completions", stream=True, timeout=120, json={
            "model": "leaving", "prompt": PROMPT, "max_tokens": 40, "ignore_eos": True, "temperature": 0,
            "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                models.append(json.loads(line[len(b"data: "):])["model"])
                if len(models) == 1:
                    unloaded = requests.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "leaving"},
                                             timeout=60)
                    assert unloaded.status_code == 200, unloaded.text
    assert len(models) > 5 and set(models) == {"leaving"}, models
    assert "leaving" not in _models(base)
