"""Async scheduling: one step in flight. The scheduler counts work scheduled but not yet
resolved; the engine launches step N+1 before applying step N and must give the same tokens,
reasons and block accounting as lockstep, through aborts and failed steps."""
from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.core.request import RequestStatus
from pagedserve.engine_io import ModelRunnerOutput
from tests.helpers import random_prompts
from tests.unit.test_scheduler import make, req


def test_an_in_flight_sample_counts_towards_max_tokens():
    s = make()
    s.add_request(req("a", 4, max_tokens=2))
    first = s.schedule()
    assert first.num_scheduled_tokens == {"a": 4}   # the prompt; samples output token 1
    second = s.schedule()                           # token 1 still in flight: decode it anyway
    assert second.num_scheduled_tokens == {"a": 1}
    assert second.cached_requests[0].num_computed_tokens == 4
    assert s.schedule().num_scheduled_tokens == {}  # token 2 in flight is the last one
    a = s.requests["a"]
    assert (a.num_unresolved_tokens, a.num_inflight_samples) == (5, 2)
    s.update_from_output(first, ModelRunnerOutput(sampled_token_ids={"a": 7}))
    assert (a.num_computed_tokens, a.num_unresolved_tokens, a.output_token_ids) == (4, 1, [7])
    s.update_from_output(second, ModelRunnerOutput(sampled_token_ids={"a": 8}))
    assert a.output_token_ids == [7, 8] and a.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert "a" not in s.requests and s.kv.pool.num_free_blocks == 64


def test_no_preemption_of_a_request_with_work_in_flight():
    # the setting of test_scheduler's preemption test: 5 blocks of 4, two 8-token prompts
    s = make(num_blocks=5, budget=100)
    s.add_request(req("old", 8, max_tokens=10))
    s.add_request(req("new", 8, max_tokens=10, start=50))
    first = s.schedule()
    assert first.num_scheduled_tokens == {"old": 8, "new": 8}
    # both prompts in flight; old's next token needs a 3rd block (one is free), new's too,
    # but new (the victim) has work in flight: no preemption, new waits a step
    second = s.schedule()
    assert second.num_scheduled_tokens == {"old": 1} and not second.preempted_req_ids
    assert s.kv.block_ids("old") == [0, 1, 4]
    s.update_from_output(first, ModelRunnerOutput(sampled_token_ids={"old": 7, "new": 7}))
    # new's work is resolved: now it is preempted; old decodes on (its 3 blocks hold 10 tokens)
    third = s.schedule()
    assert third.preempted_req_ids == {"new"} and third.num_scheduled_tokens == {"old": 1}
    assert s.waiting[0].request_id == "new" and s.waiting[0].output_token_ids == [7]
    s.update_from_output(second, ModelRunnerOutput(sampled_token_ids={"old": 8}))
    assert s.requests["old"].output_token_ids == [7, 8]


PROMPTS = [{"prompt_token_ids": p} for p in random_prompts(8, 512, 3, 40, seed=3)]


def _llm(path, async_scheduling):
    return LLM(model=path, device="cpu", dtype="float32", max_model_len=128, skip_tokenizer_init=True,
               async_scheduling=async_scheduling, block_size=4, num_kv_blocks=200)


def _params():
    return [SamplingParams(max_tokens=4 + 3 * i, temperature=0.0, ignore_eos=True) for i in range(len(PROMPTS))]


def test_abort_while_in_flight_frees_everything(tiny_checkpoints):
    lockstep = [o.outputs[0].token_ids for o in _llm(tiny_checkpoints["llama"], False).generate(
        PROMPTS, _params(), use_tqdm=False)]
    llm = _llm(tiny_checkpoints["llama"], True)
    engine = llm.engine
    for i, (prompt, sp) in enumerate(zip(PROMPTS, _params())):
        engine.add_request(f"r{i}", prompt, sp)
    results = {}
    for _ in range(3):
        results.update({o.request_id: o for o in engine.step() if o.finished})
    assert engine.core._in_flight
    engine.abort_request("r7")          # its step is on the device right now
    while engine.has_unfinished_requests():
        results.update({o.request_id: o for o in engine.step() if o.finished})
    assert "r7" not in results
    assert [results[f"r{i}"].outputs[0].token_ids for i in range(7)] == lockstep[:7]
    pool = engine.core.kv_cache_manager.pool
    assert pool.num_free_blocks == pool.num_blocks


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["lockstep", "async"])
def test_a_failed_step_is_retried_and_the_engine_serves_on(tiny_checkpoints, async_scheduling):
    """A one-off fault in a batch step: no request fails, and recomputing gives the same
    greedy tokens."""
    llm = _llm(tiny_checkpoints["llama"], async_scheduling)
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params(), use_tqdm=False)]
    runner = llm.engine.core.executor.runner
    real = runner.execute_model
    calls = {"n": 0}

    def flaky(so, non_block=False):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real(so, non_block)

    runner.execute_model = flaky
    outs = llm.generate(PROMPTS, _params(), use_tqdm=False)
    assert calls["n"] > 3
    assert [o.outputs[0].token_ids for o in outs] == expected
    runner.execute_model = real
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params(), use_tqdm=False)] == expected


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["lockstep", "async"])
def test_a_request_whose_every_step_raises_fails_alone(tiny_checkpoints, async_scheduling):
    """Fault injected into the runner for one request (as a torch error on a bad sampling
    value would be): that request fails with the error text, the others equal a clean run."""
    llm = _llm(tiny_checkpoints["llama"], async_scheduling)
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params(), use_tqdm=False)]
    runner = llm.engine.core.executor.runner
    real = runner.execute_model
    poisoned = str(llm._request_counter + 2)   # the 3rd prompt of the next generate()

    def faulty(so, non_block=False):
        if poisoned in so.num_scheduled_tokens:
            raise RuntimeError("seed out of range")
        return real(so, non_block)

    runner.execute_model = faulty
    outs = llm.generate(PROMPTS, _params(), use_tqdm=False)
    runner.execute_model = real
    assert [o.request_id for o in outs if o.error is not None] == [poisoned]
    assert "seed out of range" in outs[2].error and outs[2].outputs[0].finish_reason == "abort"
    assert [o.outputs[0].token_ids for i, o in enumerate(outs) if i != 2] == expected[:2] + expected[3:]
    assert not llm.engine.core.scheduler.suspects
    pool = llm.engine.core.kv_cache_manager.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_penalised_requests_keep_steps_in_flight_and_lockstep_ids(tiny_checkpoints):
    """Penalties read each row's outputs, the latest still on the device under async scheduling
    (the sampler counts it there): a batch of penalised requests beside plain ones keeps a step in
    flight (no lockstep for the engine) and gives lockstep's ids. Negative penalties make the
    random model repeat what it said (its latest token most of all: a latest token left uncounted
    would show)."""
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, **extra) for extra in (
        dict(frequency_penalty=-2.0), dict(presence_penalty=-2.0), dict(repetition_penalty=0.3),
        {}, dict(frequency_penalty=-1.0, repetition_penalty=1.3), {}, dict(presence_penalty=-1.0), {})]
    plain = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)] * len(params)
    lockstep_llm = _llm(tiny_checkpoints["llama"], False)
    lockstep = [o.outputs[0].token_ids for o in lockstep_llm.generate(PROMPTS, params, use_tqdm=False)]
    unpenalised = [o.outputs[0].token_ids for o in lockstep_llm.generate(PROMPTS, plain, use_tqdm=False)]
    assert sum(a != b for a, b in zip(lockstep, unpenalised)) >= 4   # the penalties do change the ids
    engine = _llm(tiny_checkpoints["llama"], True).engine
    for i, (prompt, sp) in enumerate(zip(PROMPTS, params)):
        engine.add_request(f"r{i}", prompt, sp)
    results, in_flight = {}, 0
    while engine.has_unfinished_requests():
        results.update({o.request_id: o for o in engine.step() if o.finished})
        in_flight += bool(engine.core._in_flight)
    assert in_flight >= 8   # a step stayed on the device between engine steps
    assert [results[f"r{i}"].outputs[0].token_ids for i in range(len(params))] == lockstep
