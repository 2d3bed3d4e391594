"""Tensor-parallel start-up on CPU (gloo): a rank that dies while starting fails LLM() within
seconds with that rank's own error, and leaves no process behind; a script read from standard
input starts ranks like a script file does (ranks are `python -m pagedserve.worker` processes,
they need nothing from the user's __main__). Issue 17 part 1: however a TP=2 script ends (its
last line, shutdown(), garbage collection of the LLM, Ctrl-C mid-generate) and however the TP=2
server is stopped (SIGTERM, Ctrl-C; engine core on a thread or in its own process), it and every
rank are gone within 10 s."""
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

from pagedserve import LLM
from pagedserve.errors import EngineDeadError
from pagedserve.worker.tp_executor import DEFAULT_TIMEOUT_S

REPO = Path(__file__).resolve().parents[2]

# Installed as sitecustomize.py in a folder on the ranks' PYTHONPATH: only processes started with
# --spawned (rank 1) fail, the test process (rank 0) is already running and never reads it.
FAULTS = textwrap.dedent('''
    import importlib.abc, os, sys
    MODE = os.environ.get("PAGEDSERVE_TEST_RANK_FAULT")

    class _Fault(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if MODE == "import" and name == "pagedserve.worker.tp_worker":
                raise ImportError("simulated: rank cannot import its worker module")
            if MODE == "load" and name == "pagedserve.worker.model_runner":
                import importlib.machinery
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                run_module = spec.loader.exec_module

                def exec_module(module):
                    run_module(module)

                    def load_model(runner):
                        raise MemoryError("simulated: out of memory while loading rank 1's shard")
                    module.ModelRunner.load_model = load_model
                spec.loader.exec_module = exec_module
                return spec
            return None

    if MODE and "--spawned" in sys.argv:
        sys.meta_path.insert(0, _Fault())
''')


def _spawned_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "--spawned" in p.cmdline()]


def _running_rank(pid: int) -> bool:
    """Whether `pid` is still a running rank (not exited, not a zombie, not a reused pid)."""
    try:
        rank = psutil.Process(pid)
        return rank.status() != psutil.STATUS_ZOMBIE and "--spawned" in rank.cmdline()
    except psutil.NoSuchProcess:
        return False


def _wait_no_children(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in _spawned_children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        assert time.monotonic() < deadline, f"ranks left behind: {alive}"
        time.sleep(0.1)


@pytest.mark.parametrize("mode, expected", [
    ("import", r"rank 1 \(pid \d+\) exited with code 1 before it joined the group(.|\n)*simulated: rank cannot "
               r"import its worker module"),
    ("load", r"rank 1 \(pid \d+\) exited with code 1 before it loaded its shard(.|\n)*simulated: out of memory "
             r"while loading rank 1's shard"),
])
def test_a_rank_that_dies_while_starting_fails_the_engine_at_once(mode, expected, tiny_checkpoints, tmp_path,
                                                                  monkeypatch):
    (tmp_path / "sitecustomize.py").write_text(FAULTS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PAGEDSERVE_TEST_RANK_FAULT", mode)
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match=expected):
        LLM(model=tiny_checkpoints["llama"], device="cpu", dtype="float32", skip_tokenizer_init=True,
            max_model_len=128, tensor_parallel_size=2)
    # at once: not after the ranks' start-up timeout (DEFAULT_TIMEOUT_S, 600 s); the bound leaves a
    # busy CI machine room to start and import the rank
    assert time.monotonic() - start < DEFAULT_TIMEOUT_S / 5
    _wait_no_children(10)


def test_a_script_read_from_stdin_runs_tp2_and_its_shutdown_ends_every_rank(tiny_checkpoints):
    """A TP=2 script read from standard input generates, then calls shutdown(): its rank 1 is gone
    and the script has exited within 10 s of the call."""
    script = textwrap.dedent(f"""
        import time
        from pagedserve import LLM, SamplingParams
        llm = LLM(model={tiny_checkpoints['llama']!r}, device="cpu", dtype="float32", skip_tokenizer_init=True,
                  max_model_len=128, tensor_parallel_size=2)
        print("RANK1", llm.engine.core.executor.processes[0].pid, flush=True)
        out = llm.generate([{{"prompt_token_ids": [5, 17, 300, 42]}}], SamplingParams(max_tokens=4, temperature=0),
                           use_tqdm=False)
        print("TOKENS", out[0].outputs[0].token_ids, flush=True)
        print("SHUTDOWN", time.time(), flush=True)
        llm.shutdown()
    """)
    proc = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    exited = time.time()
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert len(eval(lines["TOKENS"])) == 4, proc.stdout
    assert exited - float(lines["SHUTDOWN"]) < 10
    # the script is gone, so an orphaned rank would no longer be our descendant: look it up by pid
    assert not _running_rank(int(lines["RANK1"])), "rank 1 outlived shutdown()"


def test_a_dropped_llm_stops_its_ranks(tiny_checkpoints):
    """No shutdown() call: garbage collection of the LLM stops rank 1 while the script runs on,
    and the script then exits at once."""
    script = textwrap.dedent(f"""
        import gc, time
        from pagedserve import LLM
        llm = LLM(model={tiny_checkpoints['llama']!r}, device="cpu", dtype="float32", skip_tokenizer_init=True,
                  max_model_len=128, tensor_parallel_size=2)
        print("RANK1", llm.engine.core.executor.processes[0].pid, flush=True)
        del llm
        gc.collect()
        print("DROPPED", flush=True)
        time.sleep(float(input()))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        rank1 = psutil.Process(int(proc.stdout.readline().split()[1]))
        assert proc.stdout.readline().strip() == "DROPPED"
        deadline = time.monotonic() + 10
        while rank1.is_running() and rank1.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "rank 1 outlived its dropped LLM"
            time.sleep(0.1)
        proc.stdin.write("0\n")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()


@pytest.mark.parametrize("how", ["end of script", "SIGINT"])
def test_a_tp2_script_exits_within_10s_and_leaves_no_rank(how, tiny_checkpoints):
    """Whether a TP=2 script ends by its last line (no shutdown() call) or by Ctrl-C in the middle
    of generate (rank 1 then waits in a collective rank 0 left), it is gone within 10 s and so is
    every rank it started. (SIGTERM and SIGKILL: test_workers_exit_when_rank0_is_killed.)"""
    script = textwrap.dedent(f"""
        import sys
        from pagedserve import LLM, SamplingParams
        llm = LLM(model={tiny_checkpoints['llama']!r}, device="cpu", dtype="float32", skip_tokenizer_init=True,
                  max_model_len=512, tensor_parallel_size=2)
        print("RANK1", llm.engine.core.executor.processes[0].pid, flush=True)
        if sys.argv[1] != "end of script":
            print("GENERATING", flush=True)
            llm.generate([{{"prompt_token_ids": [5, 17, 300]}}] * 4, SamplingParams(max_tokens=400, ignore_eos=True),
                         use_tqdm=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, how], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=REPO)
    try:
        rank1 = psutil.Process(int(proc.stdout.readline().split()[1]))
        if how != "end of script":
            assert proc.stdout.readline().strip() == "GENERATING"
            time.sleep(1.0)   # in the middle of generate: rank 1 waits in a collective of this step or the next
            proc.send_signal(getattr(signal, how))
        start = time.monotonic()
        proc.wait(timeout=10)
        assert time.monotonic() - start < 10
        assert proc.returncode == (0 if how == "end of script" else -signal.SIGINT)
        rank1.wait(timeout=max(0.1, 10 - (time.monotonic() - start)))   # reaped by the script, or gone
    except psutil.NoSuchProcess:
        pass
    finally:
        proc.kill()
    assert not rank1.is_running() or rank1.status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("how, core", [("SIGTERM", "--no-engine-process"), ("SIGINT", "--engine-process")])
def test_the_tp2_server_exits_within_10s_of_a_signal_mid_request(how, core, tiny_checkpoints, tmp_path):
    """SIGTERM, or Ctrl-C (SIGINT to every process of the group, as a terminal sends it), while a long
    request runs: open requests get a short grace period (--shutdown-timeout 1: a loaded CI machine
    keeps more of the 10 s for the shutdown itself), then the server, its engine-core process (the
    default with a GPU) and its rank are gone within 10 s."""
    import threading
    from pagedserve.models.loader import materialize_gguf, resolve_model
    from tests.server.conftest import start_server
    tokenizer = materialize_gguf(resolve_model(None)).directory   # the default model's tokenizer; ids < 512
    server = start_server(tmp_path, "server", tiny_checkpoints["llama"], "--tokenizer", tokenizer, "--device", "cpu",
                          "--dtype", "float32", "--max-model-len", "512", "--tensor-parallel-size", "2", core,
                          "--log-level", "info", "--shutdown-timeout", "1")
    try:
        server.wait_healthy(timeout=90)
        everyone = psutil.Process(server.process.pid).children(recursive=True)
        rank1 = [p for p in everyone if "--spawned" in p.cmdline()]
        cores = [p for p in everyone if "pagedserve.frontend.core_process" in " ".join(p.cmdline())]
        assert len(rank1) == 1 and len(cores) == (core == "--engine-process"), everyone
        body = {"model": "llama", "prompt": [5, 17, 300, 42], "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        threading.Thread(target=lambda: _post_ignoring_errors(f"{server.base_url}/v1/completions", body),
                         daemon=True).start()
        time.sleep(1.0)
        for process in [server.process] + (everyone if how == "SIGINT" else []):
            process.send_signal(getattr(signal, how))
        start = time.monotonic()
        server.process.wait(timeout=10)
        assert time.monotonic() - start < 10
        gone, alive = psutil.wait_procs(everyone, timeout=max(0.1, 10 - (time.monotonic() - start)))
        assert not alive
        # the engine was stopped by the server, not left to the ranks' parent-death watches, and
        # SIGTERM still ends the process as SIGTERM does
        assert "stopping the engine" in server.log_tail(), server.log_tail()
        assert server.process.returncode == (-signal.SIGTERM if how == "SIGTERM" else 0)
    finally:
        server.process.kill()


def _post_ignoring_errors(url: str, body: dict) -> None:
    import requests
    try:
        requests.post(url, json=body, timeout=30)
    except requests.RequestException:
        pass
