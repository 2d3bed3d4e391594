"""Scheduling policy "priority" through the offline API (vLLM's LLM.generate(..., priority=)):
one sequence slot, so requests run one after another in (priority, arrival) order; the
tokens are the first-come-first-served engine's; a priority without the policy, or a list
of the wrong length, is a ValidationError naming `priority` and queues nothing. The
scheduler's own order and preemption: tests/unit/test_scheduler.py; over HTTP:
tests/server/test_engine_process.py."""
from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.errors import ValidationError
from tests.helpers import random_prompts

PROMPTS = random_prompts(5, 512, 5, 12, seed=3)
PRIORITIES = [3, 1, 2, 1, -4]
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def _llm(checkpoint: str, **kwargs) -> LLM:
    return LLM(model=checkpoint, device="cpu", dtype="float32", max_model_len=64, num_kv_blocks=64,
               skip_tokenizer_init=True, max_num_seqs=1, **kwargs)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_one_slot_runs_requests_in_priority_order_with_fcfs_tokens(tiny_checkpoints, async_scheduling) -> None:
    checkpoint = tiny_checkpoints["llama"]
    fcfs = _llm(checkpoint, scheduling_policy="fcfs")
    try:
        reference = fcfs.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    finally:
        fcfs.shutdown()
    llm = _llm(checkpoint, scheduling_policy="priority", async_scheduling=async_scheduling)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False,
                               priority=PRIORITIES)
        assert [o.outputs[0].token_ids for o in outputs] == [r.outputs[0].token_ids for r in reference]
        order = sorted(range(len(PROMPTS)), key=lambda i: outputs[i].metrics["first_token_time"])
        assert order == [4, 1, 3, 2, 0]   # -4, then the two 1s as they came, 2, 3
        # and without priorities it is first come, first served
        plain = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        assert sorted(range(len(PROMPTS)), key=lambda i: plain[i].metrics["first_token_time"]) == [0, 1, 2, 3, 4]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_by_priority_keeps_every_token(tiny_checkpoints, async_scheduling) -> None:
    """Eight requests of up to 60 tokens in a pool of 24 blocks of 16 tokens: requests are
    preempted (the lowest priority first) and recomputed, and every output is still the one
    the request gets alone."""
    checkpoint = tiny_checkpoints["llama"]
    prompts = random_prompts(8, 512, 20, 40, seed=5)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    alone = _llm(checkpoint)
    try:
        reference = [alone.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids
                     for p in prompts]
    finally:
        alone.shutdown()
    llm = LLM(model=checkpoint, device="cpu", dtype="float32", max_model_len=64, num_kv_blocks=24, block_size=16,
              skip_tokenizer_init=True, scheduling_policy="priority", async_scheduling=async_scheduling,
              preemption_mode="recompute")
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                               priority=[5, 0, 5, 1, 9, 0, 3, 2])
        assert llm.engine.core.scheduler.stats.num_preemptions > 0
    finally:
        llm.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == reference


def test_priority_needs_the_policy_and_one_per_prompt(tiny_checkpoints) -> None:
    llm = _llm(tiny_checkpoints["llama"])
    try:
        with pytest.raises(ValidationError) as info:
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]], GREEDY, use_tqdm=False, priority=[0, 2])
        assert info.value.param == "priority" and "scheduling_policy='priority'" in str(info.value)
        assert not llm.engine.has_unfinished_requests()   # the first (priority 0) was taken back
        with pytest.raises(ValidationError) as info:
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:2]], GREEDY, use_tqdm=False, priority=[0])
        assert info.value.param == "priority"
        assert llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False, priority=[0])
    finally:
        llm.shutdown()
    with pytest.raises(ValidationError) as info:
        LLM(model=tiny_checkpoints["llama"], device="cpu", skip_tokenizer_init=True, scheduling_policy="lifo")
    assert info.value.param == "scheduling_policy"
