"""Pipeline parallelism on CPU (gloo, real rank processes): PP=2 and TP=2 x PP=2 give PP=1's
greedy tokens per architecture on tiny fp32 checkpoints, through chunked prefill and
preemption; the scheduler splits the running requests into disjoint micro-batches; a killed
stage fails the engine with EngineDeadError."""
from __future__ import annotations

import os
import signal
import time

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.engine_io import ModelRunnerOutput
from pagedserve.errors import EngineDeadError, ValidationError
from pagedserve.layers.parallel import stage_layers
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
    reference = _run(_llm(checkpoints[arch]))
    # 32 tokens a step: prompts are chunked; 9 blocks of 16 for 6 sequences of up to 52 tokens: preemption
    llm = _llm(checkpoints[arch], tensor_parallel_size=tp, pipeline_parallel_size=2,
               max_num_batched_tokens=32, num_kv_blocks=9)
    try:
        core = llm.engine.core
        assert len(core.executor.processes) == 2 * tp - 1 and core.executor.max_concurrent_batches == 2
        assert _run(llm) == reference
        assert core.scheduler.stats.num_preemptions > 0
        if then is not None:
            then(llm)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("arch, tp", [("llama3_tied", 1), ("mistral", 1), ("qwen2", 1), ("qwen3", 1),
                                      ("llama3_tied", 2), ("qwen3", 2)])
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
