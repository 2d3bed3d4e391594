"""Pipeline parallelism on CPU (gloo, real rank processes): PP=2 and TP=2 x PP=2 give PP=1's
greedy tokens for every architecture on tiny fp32 checkpoints, through chunked prefill and
preemption, each stage building and caching only its own layers; the scheduler splits the
running requests into disjoint micro-batches; a killed stage fails the engine with
EngineDeadError (and /health 503: test_tensor_parallel.py's server test). On one process:
two stages' runners with their CUDA-graph runners (replays stood in for by eager forwards, so
the static buffers, bucket padding, receive-into and send-after-replay plumbing run on CPU)
give PP=1's tokens."""
from __future__ import annotations

import os
import signal
import time
from collections import deque

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.engine_args import EngineArgs
from pagedserve.engine_io import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput
from pagedserve.errors import EngineDeadError, ValidationError
from pagedserve.layers import parallel
from pagedserve.layers.parallel import ModelParallel, stage_layers
from pagedserve.worker.model_runner import ModelRunner
from pagedserve.worker.pipeline import MAX_UNFINISHED_SENDS
from pagedserve.worker.tp_worker import NoopMessage, StepMessage, answer, run_message
from tests.helpers import random_prompts
from tests.unit.test_scheduler import make, req

PROMPTS = random_prompts(6, 512, 3, 40, seed=2)
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _llm(path: str, **kwargs) -> LLM:
    return LLM(model=path, device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=128, **kwargs)


def _run(llm: LLM) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _check_stages(arch: str, tp: int, checkpoints: dict[str, str], then=None) -> None:
    one = _llm(checkpoints[arch])
    reference, one_kv = _run(one), one.engine.core.executor.runner.kv_cache
    # 32 tokens a step: prompts are chunked; 9 blocks of 16 for 6 sequences of up to 52 tokens: preemption
    llm = _llm(checkpoints[arch], tensor_parallel_size=tp, pipeline_parallel_size=2,
               max_num_batched_tokens=32, num_kv_blocks=9)
    try:
        core = llm.engine.core
        assert len(core.executor.processes) == 2 * tp - 1 and core.executor.max_concurrent_batches == 2
        assert _run(llm) == reference
        # rank 0 (stage 0 of 2 layers) built and caches layer 0 only: K and V planes of one layer, its KV heads
        runner = core.executor.runner
        assert [type(layer).__name__ for layer in runner.model.model.layers][1] == "Identity"
        assert runner.kv_cache.shape == (2, 9, one_kv.shape[2], one_kv.shape[3] // tp, one_kv.shape[4])
        assert one_kv.shape[0] == 4
        assert core.scheduler.stats.num_preemptions > 0
        # gloo sends never report completion: rank 0 keeps a bounded tail of them (it reaches the bound here)
        sends = [len(group) for group in core.executor.pipe._sending.values()]
        assert sends and max(sends) <= MAX_UNFINISHED_SENDS
        if then is not None:
            then(llm)
    finally:
        llm.shutdown()
    if then is None:   # every rank left cleanly: none failed a receive from a stage stopped before it
        assert [p.exitcode for p in llm.engine.core.executor.processes] == [0] * (2 * tp - 1)


# every architecture at PP=2 and at TP=2 x PP=2 (llama at PP=2: the killed-stage test below)
@pytest.mark.parametrize("arch, tp", [("llama3_tied", 1), ("mistral", 1), ("qwen2", 1), ("qwen3", 1),
                                      ("llama3_tied", 2), ("mistral", 2), ("qwen2", 2), ("qwen3", 2)])
def test_pipeline_stages_give_the_tokens_of_one_process(arch, tp, tiny_checkpoints):
    _check_stages(arch, tp, tiny_checkpoints)


def test_llama_stages_then_a_killed_stage_fails_the_engine(tiny_checkpoints):
    """llama's PP=2 tokens, then rank 1 (the last stage) is killed: EngineDeadError naming it."""
    def kill_rank1(llm: LLM) -> None:
        os.kill(llm.engine.core.executor.processes[0].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="rank 1"):
            _run(llm)
        assert time.monotonic() - start < 30
        assert not llm.engine.core.is_alive()
    _check_stages("llama", 1, tiny_checkpoints, then=kill_rank1)


def test_micro_batches_are_disjoint():
    """PP=2: a step takes half of what could run and never a request whose token is in flight."""
    s = make(budget=100)
    s.micro_batches = 2
    for i in range(4):
        s.add_request(req(f"r{i}", 4, max_tokens=5, start=10 * i))
    first, second = s.schedule(), s.schedule()
    assert first.num_scheduled_tokens == {"r0": 4, "r1": 4}
    assert second.num_scheduled_tokens == {"r2": 4, "r3": 4}
    assert s.schedule().num_scheduled_tokens == {}          # everything is in flight
    s.update_from_output(first, ModelRunnerOutput(sampled_token_ids={"r0": 7, "r1": 8}))
    third = s.schedule()
    assert third.num_scheduled_tokens == {"r0": 1, "r1": 1}
    assert [c.last_token_id for c in third.cached_requests] == [7, 8]   # the first stage's input ids


def test_stage_layers_split_evenly_and_bad_sizes_name_the_knob(tiny_checkpoints):
    assert [list(stage_layers(7, 3, s)) for s in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValidationError, match=r"pipeline_parallel_size \(3\) is larger than the model's 2 layers"):
        _llm(tiny_checkpoints["llama"], pipeline_parallel_size=3)
    with pytest.raises(ValidationError, match="pipeline_parallel_size must be >= 1") as info:
        _llm(tiny_checkpoints["llama"], pipeline_parallel_size=0)
    assert info.value.param == "pipeline_parallel_size"


def test_the_core_keeps_a_step_in_flight_per_stage():
    """PP=3 on a fake executor: three disjoint micro-batches of two requests are launched before
    the first is applied, and every request gets all its tokens."""
    import dataclasses
    from pagedserve.config import ParallelConfig, SchedulerConfig
    from pagedserve.core.engine_core import EngineCore
    from tests.unit.test_engine_core import TOKEN, FakeExecutor, make_core, request
    config = dataclasses.replace(make_core(FakeExecutor()).config, parallel=ParallelConfig(pipeline_parallel_size=3),
                                 scheduler=SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=64, max_model_len=64))
    config = dataclasses.replace(config, device=dataclasses.replace(config.device, async_scheduling=True))
    executor = FakeExecutor(max_concurrent_batches=3)
    core = EngineCore(config, executor)
    for i in range(6):
        core.add_request(request(f"r{i}", max_tokens=3))
    tokens: dict[str, list[int]] = {}
    depths = []
    while core.has_unfinished_requests():
        for out in core.step().outputs:
            tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
        in_flight = [set(so.num_scheduled_tokens) for so, _ in core._in_flight]
        assert sum(map(len, in_flight)) == len(set().union(*in_flight))   # disjoint micro-batches
        depths.append(len(in_flight))
    assert [sorted(so.num_scheduled_tokens) for so, _ in executor.calls[:3]] == [["r0", "r1"], ["r2", "r3"],
                                                                                 ["r4", "r5"]]
    assert depths[:2] == [1, 2] and max(depths) == 2   # 3 launched while the oldest is awaited
    assert tokens == {f"r{i}": [TOKEN] * 3 for i in range(6)}


class _Replay:
    """A CUDA graph stand-in on CPU: replay() runs the captured forward again over the static
    buffers and copies the result into the static output, which callers then read."""

    def __init__(self, forward, size: int) -> None:
        self.forward, self.size, self.count = forward, size, 0
        self.out = forward(size)

    def replay(self) -> None:
        new = self.forward(self.size)
        for dst, src in zip(*(o if isinstance(o, tuple) else (o,) for o in (self.out, new))):
            dst.copy_(src)
        self.count += 1


class _Link:
    """Stage 0 -> stage 1 in one process: sent (hidden, residual) pairs, received in order."""

    def __init__(self, queue: deque, first: bool) -> None:
        self.queue, self.prev, self.next = queue, None if first else 0, 1 if first else None

    def send_intermediate(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        self.queue.append((hidden, residual))

    def recv_into(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        sent = self.queue.popleft()
        hidden.copy_(sent[0])
        residual.copy_(sent[1])

    def recv_intermediate(self, num_tokens: int, hidden_size: int, dtype: torch.dtype):
        return self.queue.popleft()


def test_stage_graph_buffers_give_the_tokens_of_one_process(tiny_checkpoints, monkeypatch):
    """PP=2 stage runners with graph runners (eager replays) vs a PP=1 runner: prefill graphs
    (a lone prompt, padded to 16 tokens), eager mixed steps, decode graphs (3 rows in the
    bucket of 4); greedy ids equal at every step, and both stages replayed both kinds."""
    config, _, _ = EngineArgs(model=tiny_checkpoints["llama"], device="cpu", dtype="float32", max_model_len=64,
                              block_size=4, num_kv_blocks=16, max_num_seqs=4,
                              skip_tokenizer_init=True).create_config()

    def runner(stage: int | None, link: _Link | None = None) -> ModelRunner:
        monkeypatch.setattr(parallel, "_model_parallel",
                            lambda: None if stage is None else ModelParallel(None, (0,), stage, 2))
        made = ModelRunner(config.model, config.cache, config.scheduler, config.device, config.weights,
                           torch.device("cpu"))
        made.pipeline = link
        made.load_model()
        made.init_kv_cache(16)
        if stage is not None:
            made.graph_runner = made.make_graph_runner()
            made.graph_runner._capture_all(lambda forward, size: (graph := _Replay(forward, size), graph.out))
        return made

    sent: deque = deque()
    reference, first, last = runner(None), runner(0, _Link(sent, True)), runner(1, _Link(sent, False))
    # each stage holds only its layers' KV: one of the two layers each, half the bytes per block
    assert reference.kv_cache.shape[0] == 4 and first.kv_cache.shape[0] == last.kv_cache.shape[0] == 2
    assert 2 * first.kv_bytes_per_block() == 2 * last.kv_bytes_per_block() == reference.kv_bytes_per_block()
    assert [len(r.model.attention_layers()) for r in (reference, first, last)] == [2, 1, 1]
    assert first.graph_runner.stage_in is None and last.graph_runner.stage_in[0].shape == (64, 64)   # up to the largest prefill bucket
    prompts = random_prompts(3, 512, 5, 8, seed=4)
    blocks = {"a": [5, 2, 11], "b": [9, 3, 7], "c": [1, 4, 6]}
    tokens = {rid: list(p) for rid, p in zip(blocks, prompts)}

    def step(scheduled: dict[str, int], new=(), cached=()) -> None:
        so = SchedulerOutput(num_scheduled_tokens=scheduled, total_num_scheduled_tokens=sum(scheduled.values()),
                             new_requests=[NewRequestData(r, tokens[r], len(tokens[r]), PARAMS, blocks[r], 0)
                                           for r in new],
                             cached_requests=[CachedRequestData(r, [], len(tokens[r]) - 1, None, len(tokens[r]),
                                                                tokens[r][-1]) for r in cached])
        want = reference.execute_model(so)
        assert first.execute_model(so) is None
        assert last.execute_model(so).sampled_token_ids == want.sampled_token_ids and not sent
        for rid, token in want.sampled_token_ids.items():
            tokens[rid].append(token)

    step({"a": len(tokens["a"])}, new=["a"])                              # prefill graph
    step({"a": 1, "b": len(tokens["b"])}, new=["b"], cached=["a"])        # eager (mixed)
    step({"c": len(tokens["c"])}, new=["c"])                              # prefill graph
    for _ in range(3):
        step({"a": 1, "b": 1, "c": 1}, cached=["a", "b", "c"])            # decode graph, bucket 4
    for stage in (first, last):
        graphs = stage.graph_runner
        assert graphs.graphs[4].count == 3 and graphs.prefill_graphs[16].count == 2
        assert sum(g.count for g in graphs.graphs.values()) == 3


def test_the_last_stage_launches_a_step_before_it_answers_the_one_before():
    """The last stage's sampling rank: step 2 is launched before step 1's sampled ids are
    waited for and sent; a finished step is sent before waiting for a message; a NoopMessage
    (rank 0 waits for a step no later one follows) flushes the last answer."""
    events: list[tuple] = []

    class Pending:
        def __init__(self, name: str) -> None:
            self.name, self.done = name, False

        def ready(self) -> bool:
            return self.done

        def get(self) -> ModelRunnerOutput:
            events.append(("wait", self.name))
            return ModelRunnerOutput(sampled_token_ids={self.name: 1})

    class Runner:
        is_driver = True

        def execute_model(self, so, non_block=False):
            events.append(("launch", so, non_block))
            return Pending(so)

    class Pipe:
        def forward_message(self, message) -> None:
            pass

        def send_output(self, output: ModelRunnerOutput) -> None:
            events.append(("send", *output.sampled_token_ids))

    runner, pipe = Runner(), Pipe()
    first = run_message(StepMessage("s1"), runner, pipe)
    second = run_message(StepMessage("s2"), runner, pipe, first)
    assert events == [("launch", "s1", True), ("launch", "s2", True), ("wait", "s1"), ("send", "s1")]
    assert answer(pipe, second, only_if_ready=True) is second          # the device still works on it
    second.done = True
    assert answer(pipe, second, only_if_ready=True) is None and events[-2:] == [("wait", "s2"), ("send", "s2")]
    third = run_message(StepMessage("s3"), runner, pipe)
    assert run_message(NoopMessage(), runner, pipe, third) is None and events[-2:] == [("wait", "s3"), ("send", "s3")]
