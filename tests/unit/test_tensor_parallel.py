"""Tensor parallelism on CPU (gloo, 2 processes): TP=2 gives TP=1's greedy tokens and logprobs
(within 1e-4) per architecture on tiny fp32 checkpoints; impossible splits are rejected with
clear errors; the server serves with --tensor-parallel-size 2 (and --pipeline-parallel-size 2);
a dead rank fails the engine (EngineDeadError, /health 503) instead of hanging; workers never
outlive rank 0."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import requests

from pagedserve import LLM, SamplingParams
from pagedserve.core.scheduler import Scheduler
from pagedserve.errors import EngineDeadError, ValidationError
from tests.helpers import random_prompts, write_tiny_checkpoint
from tests.server.conftest import start_server

ARCHS = ["llama", "llama3_tied", "mistral", "qwen2", "qwen3", "phi3", "qwen3_moe", "qwen2_moe"]
NEW_TOKENS = 12
REPO = Path(__file__).resolve().parents[2]
PARAMS = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=3)


def _llm(path: str, tp: int, **kwargs) -> LLM:
    return LLM(model=path, device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=128,
               tensor_parallel_size=tp, **kwargs)


def _run(llm: LLM, prompts: list[list[int]]):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def _workers(pid: int) -> list[psutil.Process]:
    """The ranks `pid` started (python -m pagedserve.worker --spawned) among its children."""
    return [p for p in psutil.Process(pid).children(recursive=True) if "--spawned" in p.cmdline()]


def _wait_gone(process: psutil.Process, timeout: float) -> None:
    """Until `process` has exited (a zombie not yet reaped by its parent counts as exited)."""
    deadline = time.monotonic() + timeout
    while process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"pid {process.pid} still running after {timeout} s"
        time.sleep(0.1)


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_matches_tp1(arch, tiny_checkpoints):
    # mixed lengths; a small batch budget forces chunked prefill across ranks too
    prompts = random_prompts(4, 512, 3, 40, seed=2)
    reference = _run(_llm(tiny_checkpoints[arch], 1), prompts)
    llm = _llm(tiny_checkpoints[arch], 2, max_num_batched_tokens=32)
    try:
        assert len(llm.engine.core.executor.processes) == 1
        got = _run(llm, prompts)
    finally:
        llm.shutdown()
    for ref, out in zip(reference, got):
        assert out.token_ids == ref.token_ids
        for ref_step, step in zip(ref.logprobs, out.logprobs):
            assert ref_step.keys() == step.keys()
            for token, lp in ref_step.items():
                assert abs(step[token].logprob - lp.logprob) <= 1e-4


@pytest.mark.parametrize("queue, steps", [("shm", 4), ("broadcast", 1)])
def test_async_tp2_matches_tp1(queue, steps, tiny_checkpoints, monkeypatch):
    # async scheduling under TP: workers take rank 0's sampled ids from the device broadcast;
    # chunked prefill and requests finishing at different steps on both step transports; with
    # decode windows of 4 (every rank runs the window's steps, each fed the last one's ids)
    monkeypatch.setenv("PAGEDSERVE_TP_STEP_QUEUE", queue)
    windows = []
    schedule = Scheduler.schedule
    monkeypatch.setattr(Scheduler, "schedule", lambda self: windows.append(schedule(self)) or windows[-1])
    prompts = random_prompts(4, 512, 3, 40, seed=3)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=2) for n in (12, 3, 7, 1)]
    reference = [o.outputs[0] for o in _llm(tiny_checkpoints["llama"], 1).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    llm = _llm(tiny_checkpoints["llama"], 2, max_num_batched_tokens=32, async_scheduling=True,
               num_scheduler_steps=steps)
    try:
        assert llm.engine.core.async_scheduling and llm.engine.core.executor.max_concurrent_batches == 2
        assert llm.engine.core.scheduler.num_scheduler_steps == steps
        assert (llm.engine.core.executor.steps.queue is not None) == (queue == "shm")
        got = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                 use_tqdm=False)]
        again = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                             use_tqdm=False)]
    finally:
        llm.shutdown()
    assert [o.token_ids for o in got] == [o.token_ids for o in reference] == again
    for ref, out in zip(reference, got):
        for ref_step, step in zip(ref.logprobs, out.logprobs):
            assert ref_step.keys() == step.keys()
    assert (max((out.num_steps for out in windows), default=1) > 1) == (steps > 1)   # windows ran where asked for


def test_tp4_matches_tp1_and_every_rank_exits_cleanly(tiny_checkpoints):
    # four ranks: 2 KV heads replicated over 4, three readers of the step queue, async scheduling's
    # sampled-id broadcast; after shutdown no rank aborted on its way out (it did at exit: code -6)
    prompts = random_prompts(4, 512, 3, 40, seed=2)
    reference = _run(_llm(tiny_checkpoints["llama"], 1), prompts)
    llm = _llm(tiny_checkpoints["llama"], 4, max_num_batched_tokens=32, async_scheduling=True)
    try:
        assert llm.engine.core.executor.steps.queue.num_readers == 3
        got = _run(llm, prompts)
    finally:
        llm.shutdown()
    assert [p.exitcode for p in llm.engine.core.executor.processes] == [0, 0, 0]
    assert [o.token_ids for o in got] == [o.token_ids for o in reference]
    for ref, out in zip(reference, got):
        for ref_step, step in zip(ref.logprobs, out.logprobs):
            assert ref_step.keys() == step.keys()
            assert max(abs(step[t].logprob - lp.logprob) for t, lp in ref_step.items()) <= 1e-4


def test_default_model_cannot_split_in_two():
    # SmolLM2-135M has 9 attention heads (3 KV heads): TP=2 is impossible, and says why
    with pytest.raises(ValidationError, match=r"num_attention_heads \(9\) is not divisible by "
                                              r"tensor_parallel_size \(2\)") as info:
        LLM(tensor_parallel_size=2, device="cpu")
    assert info.value.param == "tensor_parallel_size"


def test_bad_splits_are_rejected(tmp_path):
    path = write_tiny_checkpoint(str(tmp_path / "llama"), "llama")   # 4 heads, 2 KV heads, vocab 512
    with pytest.raises(ValidationError, match=r"num_attention_heads \(4\) is not divisible by "
                                              r"tensor_parallel_size \(3\)"):
        _llm(path, 3)
    with pytest.raises(ValidationError, match="tensor_parallel_size must be >= 1"):
        _llm(path, 0)


def test_killed_worker_fails_the_engine_clearly(tiny_checkpoints):
    llm = _llm(tiny_checkpoints["llama"], 2)
    try:
        prompts = random_prompts(2, 512, 3, 20, seed=3)
        _run(llm, prompts)
        worker = llm.engine.core.executor.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="rank 1"):
            _run(llm, prompts)
        assert time.monotonic() - start < 30
        with pytest.raises(EngineDeadError):
            llm.engine.core.executor.check_health()
    finally:
        llm.shutdown()


def test_workers_exit_when_rank0_is_killed(tiny_checkpoints, tmp_path):
    script = textwrap.dedent(f"""
        import time
        from pagedserve import LLM
        if __name__ == "__main__":
            llm = LLM(model={tiny_checkpoints['llama']!r}, device="cpu", dtype="float32",
                      skip_tokenizer_init=True, max_model_len=128, tensor_parallel_size=2)
            print("READY", llm.engine.core.executor.processes[0].pid, flush=True)
            time.sleep(120)
    """)
    (tmp_path / "rank0.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "rank0.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), line
        worker = psutil.Process(int(line.split()[1]))
        proc.kill()
        proc.wait(timeout=10)
        _wait_gone(worker, 15)    # an orphaned worker would live on
    finally:
        proc.kill()


@pytest.mark.parametrize("split", ["--tensor-parallel-size", "--pipeline-parallel-size"])
def test_server_with_two_ranks_then_a_dead_rank(split, tiny_checkpoints, tmp_path):
    """TP=2, or PP=2 (rank 1 is then the last stage): served, then rank 1 is killed: /health 503."""
    from pagedserve.models.loader import materialize_gguf, resolve_model
    tokenizer = materialize_gguf(resolve_model(None)).directory   # the default model's tokenizer; ids < 512
    server = start_server(tmp_path, "server", tiny_checkpoints["llama"], "--tokenizer", tokenizer, "--device", "cpu",
                          "--dtype", "float32", "--max-model-len", "128", split, "2",
                          "--no-engine-process")   # the core on the server's thread: it keeps serving 503s
    proc, base = server.process, server.base_url
    try:
        server.wait_healthy(timeout=90)
        body = {"model": os.path.basename(tiny_checkpoints["llama"]), "prompt": [5, 17, 300, 42],
                "max_tokens": 6, "temperature": 0}
        response = requests.post(f"{base}/v1/completions", json=body, timeout=30)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert response.json()["usage"]["completion_tokens"] == 6

        workers = _workers(proc.pid)
        assert len(workers) == 1, workers
        workers[0].kill()
        _wait_gone(workers[0], 10)
        # /health sees the dead rank by itself (no request needed), within a second
        deadline = time.monotonic() + 1.0
        while requests.get(f"{base}/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/health still 200 a second after a rank died"
            time.sleep(0.05)
        response = requests.post(f"{base}/v1/completions", json=body, timeout=30)
        assert response.status_code >= 500, response.text
        assert requests.get(f"{base}/health", timeout=5).status_code == 503
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def test_engine_process_with_tp2_then_a_dead_rank_exits_the_server(tiny_checkpoints, tmp_path):
    """The engine-process server (the default with a GPU; --engine-process on the CPU), whose
    core process starts the ranks: a dead rank ends the core, an open stream gets an error
    event, and the server exits 1 leaving no process behind, as vLLM's server does when its
    engine dies."""
    from pagedserve.models.loader import materialize_gguf, resolve_model
    tokenizer = materialize_gguf(resolve_model(None)).directory
    server = start_server(tmp_path, "server", tiny_checkpoints["llama"], "--tokenizer", tokenizer, "--device", "cpu",
                          "--dtype", "float32", "--max-model-len", "128", "--tensor-parallel-size", "2",
                          "--engine-process")
    proc = server.process
    try:
        server.wait_healthy(timeout=90)
        everyone = psutil.Process(proc.pid).children(recursive=True)
        [worker] = _workers(proc.pid)
        body = {"model": os.path.basename(tiny_checkpoints["llama"]), "prompt": [5, 17, 300, 42],
                "max_tokens": 120, "ignore_eos": True, "temperature": 0, "stream": True}
        with requests.post(f"{server.base_url}/v1/completions", json=body, stream=True, timeout=30) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith(b"data: {")   # streaming
            worker.kill()
            rest = [line for line in lines if line]   # the stream ends, no hang
        assert b'"error"' in rest[-2] and rest[-1] == b"data: [DONE]", rest[-3:]
        assert proc.wait(timeout=30) == 1
        for child in everyone:   # the core and the other rank went with it
            _wait_gone(child, 10)
    finally:
        server.stop()


def test_num_shard_environment_sets_tensor_parallel_size():
    """NUM_SHARD=N (TGI's launcher setting) is --tensor-parallel-size N; an explicit flag wins."""
    from pagedserve.server.serve import make_parser
    from pagedserve.server.tgi_settings import apply_tgi_settings
    args = make_parser().parse_args([])
    apply_tgi_settings(args, {"NUM_SHARD": "2"})
    assert args.tensor_parallel_size == 2
    args = make_parser().parse_args(["--tensor-parallel-size", "1"])
    apply_tgi_settings(args, {"NUM_SHARD": "2"})
    assert args.tensor_parallel_size == 1
    args = make_parser().parse_args(["--num-shard", "2"])
    apply_tgi_settings(args, {})
    assert args.tensor_parallel_size == 2


def test_dummy_weights_are_the_same_model_at_any_tp(tiny_checkpoints, tmp_path):
    """load_format="dummy" draws each full tensor from a generator seeded by its name, so
    TP=2 shards one model, the same as TP=1 runs (issue 9 compares them on GPU)."""
    import shutil
    shutil.copy(os.path.join(tiny_checkpoints["qwen3"], "config.json"), tmp_path)
    prompts = random_prompts(3, 512, 5, 30, seed=9)
    one = _llm(str(tmp_path), 1, load_format="dummy", seed=3)
    expected = [o.token_ids for o in _run(one, prompts)]
    one.shutdown()
    two = _llm(str(tmp_path), 2, load_format="dummy", seed=3)
    try:
        assert [o.token_ids for o in _run(two, prompts)] == expected
    finally:
        two.shutdown()


def test_an_impossible_split_fails_before_a_gguf_conversion(tmp_path, monkeypatch):
    """Cold GGUF cache: the split is checked on the file's own config before the (long)
    dequantizing conversion starts, and nothing is written to the cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from pagedserve.models.loader import gguf_cache_root
    with pytest.raises(ValidationError, match=r"num_attention_heads \(9\) is not divisible"):
        LLM(tensor_parallel_size=2, device="cpu")
    assert not os.path.exists(gguf_cache_root()) or not os.listdir(gguf_cache_root())
