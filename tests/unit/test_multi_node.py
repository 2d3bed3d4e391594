"""The two ways across machines (README, "Across machines"), on CPU over 127.0.0.1 with gloo and
PP=2, each giving the tokens of one process: ranks as Ray actors placed by a placement group on
an existing Ray cluster (`ray start --head`, reached through RAY_ADDRESS), and ranks started by
hand through torch.distributed's env:// rendezvous (`python -m pagedserve.worker`)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import ray   # in the test extra (pyproject): a missing ray fails here, it is not skipped

from pagedserve import LLM, SamplingParams
from tests.server.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [{"prompt_token_ids": [5, 17, 300, 42]}, {"prompt_token_ids": list(range(30, 60))}]
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _kwargs(checkpoints: dict[str, str]) -> dict:
    return dict(model=checkpoints["qwen3"], device="cpu", dtype="float32", skip_tokenizer_init=True,
                max_model_len=128)


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


@pytest.mark.timeout(150)
def test_ray_actor_ranks_on_an_existing_cluster_give_the_tokens_of_one_process(tiny_checkpoints, monkeypatch):
    """A one-node cluster from `ray start --head` (2 CPUs); the engine connects to it through
    RAY_ADDRESS and places rank 1 as an actor (a worker process of that cluster); shutdown
    frees the placement group."""
    expected = _tokens(LLM(**_kwargs(tiny_checkpoints)))
    # the same authentication mode for the cluster and the engine (Ray >= 2.52; README)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    port, root = free_port(), tempfile.mkdtemp(prefix="ray", dir="/tmp")   # short: Ray's socket paths
    log = open(os.path.join(root, "head.log"), "w+")
    start = time.monotonic()
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats",
                             f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={root}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    try:
        while "block forever" not in open(log.name).read():   # `ray start` is done
            assert head.poll() is None, open(log.name).read()[-3000:]
            assert time.monotonic() - start < 60, "ray start --head took over 60 s"
            time.sleep(0.2)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        llm = LLM(**_kwargs(tiny_checkpoints), pipeline_parallel_size=2, distributed_executor_backend="ray")
        try:
            executor = llm.engine.core.executor
            assert ray.get_runtime_context().gcs_address.endswith(f":{port}")   # that cluster, not a new one
            [rank1] = executor.processes
            assert type(rank1).__name__ == "RayRank"
            assert rank1.pid in {p.pid for p in psutil.Process(head.pid).children(recursive=True)}   # a cluster worker
            assert _tokens(llm) == expected
            group = executor.placement.group.id.hex()
        finally:
            llm.shutdown()
        assert ray.util.placement_group_table()[group]["state"] == "REMOVED"
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGKILL)   # the whole cluster (its own session); `ray stop` would stop every one
        head.wait(timeout=10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
    assert time.monotonic() - start < 120


@pytest.mark.timeout(90)
def test_ranks_started_by_hand_join_through_env_rendezvous(tiny_checkpoints, monkeypatch):
    """RANK=1 started by hand (`python -m pagedserve.worker`) before the engine (RANK=0 in its
    environment): PP=2 gives the tokens of one process; at shutdown rank 1 leaves with code 0."""
    expected = _tokens(LLM(**_kwargs(tiny_checkpoints)))
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    rank1 = subprocess.Popen([sys.executable, "-m", "pagedserve.worker", "--device", "cpu"],
                             env={**os.environ, **env, "RANK": "1"}, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for key, value in {**env, "RANK": "0"}.items():
            monkeypatch.setenv(key, value)
        llm = LLM(**_kwargs(tiny_checkpoints), pipeline_parallel_size=2)
        try:
            executor = llm.engine.core.executor
            assert executor.external and executor.processes == []   # nothing spawned: rank 1 is ours above
            assert _tokens(llm) == expected
            assert rank1.poll() is None
        finally:
            llm.shutdown()
        assert rank1.wait(timeout=10) == 0
    finally:
        rank1.kill()
