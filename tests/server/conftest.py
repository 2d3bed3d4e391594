"""Real server processes on free loopback ports (the embedded default model), started once
per session and killed at the end; the offline engine for reference outputs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import requests

STARTUP_TIMEOUT_S = 180.0
API_KEY = "test-key-3f9c"


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(log_dir: Path, name: str, *extra_args: str, env: dict[str, str] | None = None,
                 new_session: bool = False) -> ServerProcess:
    """`pagedserve serve` on a free loopback port (logs in log_dir/name.log). With `env`, the
    process gets exactly that environment and, if it holds PORT, no --port flag: the port
    then comes from the environment alone (TGI's launcher setting). new_session: in a process
    group of its own (its pid is the group's id), for a signal to the whole group."""
    port_from_env = env is not None and "PORT" in env
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "PAGEDSERVE_API_KEY"}
    port = int(env["PORT"]) if port_from_env else free_port()
    port_args = [] if port_from_env else ["--port", str(port)]
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.cli", "serve", "--host", "127.0.0.1", *port_args,
             "--log-level", "warning", *extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[2],
            start_new_session=new_session)
    return ServerProcess(process, port, log_path)


def serving(tmp_path_factory: pytest.TempPathFactory, name: str, *extra_args: str,
            env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """The body of a server fixture: a healthy server for the fixture's scope, stopped after."""
    proc = start_server(tmp_path_factory.mktemp(name), name, *extra_args, env=env)
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    # float32: the exact path (the default GGUF int4 path's greedy ids may depend on the batch)
    yield from serving(tmp_path_factory, "server", "--dtype", "float32")


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    yield from serving(tmp_path_factory, "auth_server", "--api-key", API_KEY,
                        "--served-model-name", "smol", "--num-kv-blocks", "64", "--max-model-len", "1024")


@pytest.fixture(scope="session")
def offline_llm():
    """The offline engine with the `server` fixture's settings, for reference outputs."""
    from pagedserve import LLM
    llm = LLM(dtype="float32")
    try:
        yield llm
    finally:
        llm.shutdown()


def scrape_metrics(base_url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, parsed with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families
    response = requests.get(f"{base_url}/metrics", timeout=10)
    response.raise_for_status()
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def wait_idle(base_url: str, timeout: float = 60.0) -> dict[tuple[str, tuple], float]:
    """Poll /metrics until nothing runs or waits and the KV cache is empty; the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape_metrics(base_url)
        busy = [value for (name, _), value in samples.items()
                if name in ("pagedserve:num_requests_running", "pagedserve:num_requests_waiting",
                            "pagedserve:kv_cache_usage_perc") and value != 0]
        if not busy:
            return samples
        if time.monotonic() > deadline:
            raise TimeoutError(f"server still busy after {timeout} s")
        time.sleep(0.1)


# ---- the hardening tests' server, and good traffic beside bad requests ---------------------

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GOOD = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="session")
def edge(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """The hardening tests' server (test_hardening_edge.py, test_edge_fuzz.py): the API key, 8 sequences."""
    yield from serving(tmp_path_factory, "edge", "--api-key", API_KEY, "--max-num-seqs", "8",
                        "--max-model-len", "1024", "--num-kv-blocks", "256", "--dtype", "float32")


@pytest.fixture(scope="session")
def reference_text(edge: ServerProcess) -> str:
    response = requests.post(f"{edge.base_url}/v1/completions", json=GOOD, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


class GoodTraffic:
    """`count` streamed greedy completions on threads; check() asserts each finished with
    the text the same request gets alone."""

    def __init__(self, base_url: str, count: int = 3) -> None:
        self.base_url = base_url
        self.results: list[tuple[int, str]] = []
        self.threads = [threading.Thread(target=self._one, daemon=True) for _ in range(count)]

    def _one(self) -> None:
        text, status = "", -1
        try:
            with requests.post(f"{self.base_url}/v1/completions", json={**GOOD, "stream": True}, headers=AUTH,
                               stream=True, timeout=60) as response:
                status = response.status_code
                for line in response.iter_lines():
                    if line.startswith(b"data: ") and line != b"data: [DONE]":
                        chunk = json.loads(line[6:])
                        text += "".join(c["text"] for c in chunk.get("choices", []))
        except requests.RequestException as exc:
            text = f"failed: {exc}"
        self.results.append((status, text))

    def __enter__(self) -> "GoodTraffic":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for thread in self.threads:
            thread.join(timeout=90)

    def check(self, expected: str) -> None:
        assert len(self.results) == len(self.threads)
        assert all(status == 200 for status, _ in self.results), self.results
        assert all(text == expected for _, text in self.results), (self.results, expected)


def post(server: ServerProcess, path: str, body: object = None, data: bytes | str | None = None,
         **kwargs: object) -> requests.Response:
    if data is not None:
        return requests.post(f"{server.base_url}{path}", data=data, timeout=120,
                             headers={**AUTH, "Content-Type": "application/json"}, **kwargs)
    return requests.post(f"{server.base_url}{path}", json=body, headers=AUTH, timeout=120, **kwargs)


def openai_param(response: requests.Response) -> str | None:
    return response.json()["error"]["param"]
