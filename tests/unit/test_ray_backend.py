"""distributed_executor_backend="ray" on CPU: a local Ray instance on 127.0.0.1 (2 CPUs), rank 1
a Ray actor placed by a placement group, PP=2 over gloo: the tokens of one process; shutdown
frees the placement group."""
from __future__ import annotations

import time

import pytest
import ray   # in the test extra (pyproject): a missing ray fails here, it is not skipped

from pagedserve import LLM, SamplingParams


@pytest.mark.timeout(120)
def test_ray_actor_ranks_give_the_tokens_of_one_process(tiny_checkpoints):
    prompts = [{"prompt_token_ids": [5, 17, 300, 42]}, {"prompt_token_ids": list(range(30, 60))}]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    kwargs = dict(model=tiny_checkpoints["qwen3"], device="cpu", dtype="float32", skip_tokenizer_init=True,
                  max_model_len=128)
    expected = [o.outputs[0].token_ids for o in LLM(**kwargs).generate(prompts, params, use_tqdm=False)]
    start = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        llm = LLM(**kwargs, pipeline_parallel_size=2, distributed_executor_backend="ray")
        try:
            executor = llm.engine.core.executor
            assert type(executor.processes[0]).__name__ == "RayRank"
            assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
            group = executor.placement.group.id.hex()
        finally:
            llm.shutdown()
        assert ray.util.placement_group_table()[group]["state"] == "REMOVED"
    finally:
        ray.shutdown()
    assert time.monotonic() - start < 90
