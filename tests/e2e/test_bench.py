"""`pagedserve bench` end to end, on CPU with tiny numbers:
- `bench throughput --scheduling both` on a tiny random checkpoint (token-id prompts);
- `bench serve` (openai backend, two rates, plots, goodput) against a live `pagedserve serve`;
- the tgi backend against the live server's /generate_stream when the server has it, and
  always against a small fake that speaks TGI's documented SSE format (the fake also
  fails one request on purpose and records how many streams were in flight at once).
These check counts and consistency, never speed."""
from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from pagedserve.bench.backends import RequestInput
from pagedserve.bench.metrics import compute_metrics
from pagedserve.bench.serve import run_load
from pagedserve.cli import main as cli_main
from tests.helpers import write_lora_adapter, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("bench_server") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "PAGEDSERVE_API_KEY"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "pagedserve.cli", "serve", "--host", "127.0.0.1",
                                    "--port", str(port), "--max-model-len", "512", "--log-level", "warning"],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _bench(*argv: str) -> None:
    assert cli_main(["bench", *argv]) == 0


def test_throughput_static_and_continuous(tmp_path) -> None:
    model = write_tiny_checkpoint(str(tmp_path / "tiny"), "llama")
    out = tmp_path / "thr.json"
    plot = tmp_path / "kv.png"
    # 6 prompts, 2 slots: static runs 3 batches of 2; continuous refills a slot as soon as it frees
    _bench("throughput", "--model", model, "--skip-tokenizer-init", "--max-model-len", "128",
           "--max-num-seqs", "2", "--num-prompts", "6", "--random-input-len", "24", "--random-output-len", "8",
           "--random-range-ratio", "0.5", "--scheduling", "both", "--plot", str(plot),
           "--result-filename", str(out), "--disable-tqdm")
    report = json.loads(out.read_text())
    assert report["benchmark"] == "throughput" and report["command"].startswith("pagedserve")
    assert {"cpu_model", "nproc", "torch"} <= set(report["machine"]) and report["date"]
    by_label = {r["label"]: r for r in report["results"]}
    assert set(by_label) == {"pagedserve continuous", "pagedserve static"}
    requested = None
    for result in by_label.values():
        kv = result["kv_memory"]
        assert result["num_requests"] == 6 and result["extra"]["length_capped_requests"] == 0
        requested = requested or result["total_output_tokens"]
        assert result["total_output_tokens"] == requested   # ignore_eos: same forced lengths in both
        assert kv["measured_max_concurrency"] == 2 and kv["contiguous_tokens"] == 6 * 128
        assert 0 < kv["peak_blocks_in_use"] <= kv["paged_tokens"] // 16
        assert kv["used_tokens"] == result["total_input_tokens"] + result["total_output_tokens"]
    assert report["ratios"]["continuous_over_static"] > 0
    assert plot.stat().st_size > 10_000


def test_serve_openai_against_live_server(live_server, tmp_path) -> None:
    out = tmp_path / "serve.json"
    plot = tmp_path / "cdf.png"
    num_prompts, output_len = 4, 6
    _bench("serve", "--base-url", live_server, "--backend", "openai", "--num-prompts", str(num_prompts),
           "--random-input-len", "16", "--random-output-len", str(output_len), "--ignore-eos",
           "--request-rate", "8,inf", "--goodput", "ttft:600000", "e2el:600000", "--save-detailed",
           "--plot", str(plot), "--result-filename", str(out), "--disable-tqdm")
    report = json.loads(out.read_text())
    assert [run["request_rate"] for run in report["runs"]] == [8.0, "inf"]   # strict JSON: no Infinity
    for run in report["runs"]:
        m = run["metrics"]
        assert (m["completed"], m["failed"]) == (num_prompts, 0)
        assert m["total_output_tokens"] == num_prompts * output_len   # usage from the server, forced lengths
        assert m["total_input_tokens"] >= num_prompts * 16
        assert m["good_requests"] == num_prompts                      # SLOs of 10 minutes
        for r in run["requests"]:
            assert r["success"] and 0 < r["ttft"] <= r["latency"]
            assert 1 <= len(r["itl"]) <= output_len - 1
            assert r["ttft"] + sum(r["itl"]) <= r["latency"] + 1e-6
        assert m["tpot_ms"]["count"] == num_prompts and m["e2el_ms"]["mean"] >= m["ttft_ms"]["mean"]
    assert plot.stat().st_size > 10_000 and (tmp_path / "cdf_throughput.png").stat().st_size > 10_000


def test_openai_backend_counts_steps_whose_text_is_empty(live_server) -> None:
    """A request whose every token decodes to nothing (here the special token id 0, forced by
    logit_bias; on the GPU, dummy weights repeating one) still streams one chunk per step with
    text "": it succeeds, as vLLM's benchmark counts it, instead of failing for want of text."""
    forced = {"logit_bias": {"0": 100}}
    plain = requests.post(f"{live_server}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4,
                                                                "ignore_eos": True, **forced}, timeout=60).json()
    assert plain["choices"][0]["text"] == "" and plain["usage"]["completion_tokens"] == 4
    request = RequestInput(f"{live_server}/v1/completions", None, [1, 2, 3], 3, 4, ignore_eos=True, extra_body=forced)
    (result,), _ = asyncio.run(run_load("openai", [request], math.inf, show_progress=False))
    assert result.success and result.error == "" and result.generated_text == ""
    assert result.output_tokens == 4 and 0 < result.ttft <= result.latency and 1 <= len(result.itl) <= 3


def test_serve_tgi_against_live_server(live_server, tmp_path) -> None:
    probe = requests.post(f"{live_server}/generate_stream", json={"inputs": "hi", "parameters": {"max_new_tokens": 1}},
                          timeout=60)
    if probe.status_code == 404:
        pytest.skip("the server has no TGI routes yet; the tgi backend is covered by the fake below")
    out = tmp_path / "tgi.json"
    _bench("serve", "--base-url", live_server, "--backend", "tgi", "--dataset-name", "random-text",
           "--num-prompts", "4", "--random-input-len", "16", "--random-output-len", "4",
           "--result-filename", str(out), "--disable-tqdm")
    m = json.loads(out.read_text())["runs"][0]["metrics"]
    assert (m["completed"], m["failed"]) == (4, 0) and 4 <= m["total_output_tokens"] <= 16


FIRST_TOKEN_S, GAP_S = 0.05, 0.01


class FakeTGI:
    """A TGI-shaped /generate_stream on its own thread and event loop: one `data:{json}`
    event per token, generated_text and details on the last; HTTP 500 for inputs that
    contain "fail". Records the request bodies and the most streams in flight at once."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)

    async def _start(self):
        from aiohttp import web
        app = web.Application()
        app.router.add_post("/generate_stream", self._generate_stream)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        return runner

    async def _generate_stream(self, request):
        from aiohttp import web
        body = await request.json()
        self.bodies.append(body)
        if "fail" in body["inputs"]:
            return web.json_response({"error": "boom", "error_type": "generation"}, status=500)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        count = body["parameters"]["max_new_tokens"]
        await asyncio.sleep(FIRST_TOKEN_S)
        for index in range(1, count + 1):
            last = index == count
            event = {"index": index, "token": {"id": index, "text": " t", "logprob": -0.5, "special": False},
                     "generated_text": " t" * count if last else None,
                     "details": {"finish_reason": "length", "generated_tokens": count, "seed": None} if last else None}
            await response.write(f"data:{json.dumps(event)}\n\n".encode())
            if not last:
                await asyncio.sleep(GAP_S)
        self.in_flight -= 1
        await response.write_eof()
        return response

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def fake_tgi():
    server = FakeTGI()
    yield server
    server.close()


def test_serve_tgi_backend_against_fake_tgi(fake_tgi) -> None:
    max_new = 5
    inputs = [RequestInput(f"{fake_tgi.url}/generate_stream", None, f"prompt {i}" if i != 3 else "please fail", 2,
                           max_new) for i in range(6)]
    results, duration = asyncio.run(run_load("tgi", inputs, math.inf, max_concurrency=2, show_progress=False))
    assert fake_tgi.bodies[0] == {"inputs": "prompt 0", "parameters": {"max_new_tokens": max_new,
                                                                       "do_sample": False, "details": True}}
    assert fake_tgi.max_in_flight == 2   # --max-concurrency 2 with all 6 sent at once
    assert [r.success for r in results] == [True, True, True, False, True, True]
    assert results[3].error.startswith("HTTP 500")
    for r in results[:3] + results[4:]:
        assert r.output_tokens == max_new and r.generated_text == " t" * max_new
        # one gap per later token; a single gap can look short when a busy client reads two chunks
        # late together, but the whole stream cannot end before the server's sleeps have passed
        assert len(r.itl) == max_new - 1 and r.latency >= r.ttft + sum(r.itl) - 1e-6
        assert r.ttft >= FIRST_TOKEN_S * 0.9 and r.latency >= (FIRST_TOKEN_S + (max_new - 1) * GAP_S) * 0.9
    m = compute_metrics(results, duration)
    assert (m.completed, m.failed, m.total_output_tokens, m.total_input_tokens) == (5, 1, 25, 10)
    assert m.itl_ms.count == 5 * (max_new - 1) and m.tpot_ms.count == 5


def test_serve_tgi_cli_against_fake_tgi(fake_tgi, tmp_path) -> None:
    """The CLI path: token-id prompts decoded with the default model's tokenizer, since TGI takes text."""
    out = tmp_path / "tgi.json"
    _bench("serve", "--base-url", fake_tgi.url, "--backend", "tgi", "--num-prompts", "4", "--random-input-len", "8",
           "--random-output-len", "3", "--max-concurrency", "4", "--result-filename", str(out), "--disable-tqdm")
    m = json.loads(out.read_text())["runs"][0]["metrics"]
    assert (m["completed"], m["failed"], m["total_output_tokens"]) == (4, 0, 12)
    assert len(fake_tgi.bodies) == 5   # the initial test request, then the 4
    assert all(isinstance(b["inputs"], str) and b["inputs"] for b in fake_tgi.bodies)


def test_throughput_and_latency_with_lora_adapters(tmp_path, capsys) -> None:
    """--lora-path (vLLM's flag): every request runs the adapter under one of --max-loras ids."""
    model = write_tiny_checkpoint(str(tmp_path / "tiny"), "llama")
    write_lora_adapter(model, str(tmp_path / "lora"), seed=1)
    out = tmp_path / "thr.json"
    common = ("--model", model, "--skip-tokenizer-init", "--max-model-len", "128", "--lora-path", str(tmp_path / "lora"),
              "--max-loras", "2", "--disable-tqdm")
    _bench("throughput", *common, "--num-prompts", "8", "--random-input-len", "16", "--random-output-len", "4",
           "--result-filename", str(out))
    (result,) = json.loads(out.read_text())["results"]
    runs = result["extra"]["lora_requests"]
    assert set(runs) == {"lora1", "lora2"} and sum(runs.values()) == 8 and result["total_output_tokens"] == 32
    _bench("latency", *common, "--batch-size", "2", "--input-len", "8", "--output-len", "3", "--num-iters", "1",
           "--num-iters-warmup", "0", "--result-filename", str(tmp_path / "lat.json"))
    assert cli_main(["bench", "throughput", *common, "--backend", "hf"]) != 0
    assert "--lora-path runs the pagedserve backend only" in capsys.readouterr().err

