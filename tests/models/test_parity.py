"""Greedy token ids identical to transformers' generate, per architecture, on tiny random
fp32 checkpoints: one request, a batch of mixed lengths, chunked prefill, preemption (by
recompute and by swap to the host tier), prefix hits from the host tier."""
from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from tests.helpers import TEST_DEVICE, hf_greedy, random_prompts

ARCHS = ["llama", "llama3_tied", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen3_moe", "qwen2_moe",
         "qwen2_yarn"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    """arch -> (prompts, transformers' greedy continuations)."""
    from transformers import AutoModelForCausalLM
    out = {}
    prompts = random_prompts(6, 512, 3, 60, seed=1)
    for arch in ARCHS:
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], dtype=torch.float32).eval()
        out[arch] = (prompts, [hf_greedy(model, p, NEW_TOKENS) for p in prompts])
    return out


def _llm(path: str, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 256)
    return LLM(model=path, device=TEST_DEVICE, dtype="float32", **kwargs)


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ARCHS)
def test_single_and_batch(arch, tiny_checkpoints, references):
    prompts, expected = references[arch]
    llm = _llm(tiny_checkpoints[arch], skip_tokenizer_init=True)
    assert _generate(llm, prompts[:1]) == expected[:1]
    assert _generate(llm, prompts) == expected
    pool = llm.engine.core.kv_cache_manager.pool
    assert pool.num_free_blocks == pool.num_blocks


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_prefill(arch, tiny_checkpoints, references):
    prompts, expected = references[arch]
    llm = _llm(tiny_checkpoints[arch], skip_tokenizer_init=True, max_num_batched_tokens=32)
    assert _generate(llm, prompts) == expected


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_preemption(arch, tiny_checkpoints, references):
    prompts, expected = references[arch]
    # 6 requests need up to 6 * ceil(84/4) = 126 blocks of 4; give them 40.
    llm = _llm(tiny_checkpoints[arch], skip_tokenizer_init=True, block_size=4, num_kv_blocks=40,
               max_model_len=128, swap_space=0)   # no host tier: recompute
    assert _generate(llm, prompts) == expected
    assert llm.engine.core.scheduler.stats.num_preemptions > 0
    kv = llm.engine.core.kv_cache_manager
    assert kv.pool.num_free_blocks == kv.pool.num_blocks and kv.stats.blocks_swapped_in == 0


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["lockstep", "async"])
@pytest.mark.parametrize("arch", ARCHS)
def test_preemption_by_swap(arch, async_scheduling, tiny_checkpoints, references):
    """Preempted requests go to the host tier and come back (the default mode): the same ids;
    then a second pass whose prefixes the 40-block device cache evicted to the host tier
    loads them back. Both pools end with every block free."""
    if async_scheduling and arch != "llama":
        pytest.skip("async scheduling: one architecture is enough")
    prompts, expected = references[arch]
    llm = _llm(tiny_checkpoints[arch], skip_tokenizer_init=True, block_size=4, num_kv_blocks=40,
               max_model_len=128, async_scheduling=async_scheduling)
    assert _generate(llm, prompts) == expected
    core = llm.engine.core
    kv = core.kv_cache_manager
    assert core.scheduler.stats.num_swap_preemptions > 0
    assert kv.stats.blocks_swapped_in > 0 and core.stats().kv_offload_blocks_swapped_out > 0
    assert _generate(llm, prompts) == expected
    assert kv.stats.host_hits > 0
    for pool in (kv.pool, kv.host):
        assert pool.num_free_blocks == pool.num_blocks
    assert not kv.req_to_host_blocks


def test_swap_without_prefix_caching_loads_every_block(tiny_checkpoints, references):
    """No prefix cache: a resumed request shares nothing and loads all its blocks back."""
    prompts, expected = references["llama"]
    llm = _llm(tiny_checkpoints["llama"], skip_tokenizer_init=True, block_size=4, num_kv_blocks=40,
               max_model_len=128, enable_prefix_caching=False)
    assert _generate(llm, prompts) == expected
    core = llm.engine.core
    kv = core.kv_cache_manager
    swaps = core.scheduler.stats.num_swap_preemptions
    assert swaps > 0 and core.scheduler.stats.num_preemptions == swaps
    assert kv.stats.blocks_swapped_in == kv.stats.blocks_swapped_out > 0 and kv.stats.host_hits == 0
    for pool in (kv.pool, kv.host):
        assert pool.num_free_blocks == pool.num_blocks
    assert not kv.req_to_host_blocks


def test_prefix_cache_hit_keeps_parity(tiny_checkpoints, references):
    prompts, expected = references["llama"]
    llm = _llm(tiny_checkpoints["llama"], skip_tokenizer_init=True, block_size=4)
    assert _generate(llm, prompts) == expected
    stats = llm.engine.core.kv_cache_manager.stats
    hits_before = stats.hits
    assert _generate(llm, prompts) == expected   # the second pass is served from the prefix cache
    assert stats.hits - hits_before == sum((len(p) - 1) // 4 * 4 for p in prompts)


@pytest.mark.parametrize("kwargs", [{}, {"max_num_batched_tokens": 32},
                                    {"block_size": 4, "num_kv_blocks": 40, "max_model_len": 128}],
                         ids=["batch", "chunked", "preemption"])
def test_async_scheduling_keeps_parity(kwargs, tiny_checkpoints, references):
    """One step in flight (the next scheduled before the last one's tokens are back): the same
    ids for a batch, chunked prefill, preemption (never of a request with work in flight) and
    prefix-cache hits; every block comes back."""
    prompts, expected = references["llama"]
    llm = _llm(tiny_checkpoints["llama"], skip_tokenizer_init=True, async_scheduling=True, **kwargs)
    assert llm.engine.core.async_scheduling
    assert _generate(llm, prompts) == expected
    if "num_kv_blocks" in kwargs:
        assert llm.engine.core.scheduler.stats.num_preemptions > 0
        assert _generate(llm, prompts) == expected   # again, now with prefix-cache hits
    pool = llm.engine.core.kv_cache_manager.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert not llm.engine.core.has_unfinished_requests()


def test_single_prefills_keep_parity(tiny_checkpoints, references):
    """Requests one at a time (on CUDA: padded single-sequence prefill graphs), the second round
    from the prefix cache (a graph over a cached context); ids equal transformers'."""
    prompts, expected = references["llama"]
    llm = _llm(tiny_checkpoints["llama"], skip_tokenizer_init=True, block_size=4)
    graphs = llm.engine.core.executor.runner.graph_runner
    replays = []
    if graphs is not None:   # CUDA: count the prefill graph replays
        run_prefill = graphs.run_prefill
        graphs.run_prefill = lambda inputs: replays.append(inputs.query_lens[0]) or run_prefill(inputs)
    try:
        for _ in range(2):
            assert [_generate(llm, [p])[0] for p in prompts] == expected
    finally:
        if graphs is not None:
            del graphs.run_prefill   # the wrapper's cycle through the runner kept the engine's memory
    if graphs is not None:
        # every prompt's prefill, the second time only its uncached tail
        assert replays[:len(prompts)] == [len(p) for p in prompts]
        assert replays[len(prompts):] == [len(p) - (len(p) - 1) // 4 * 4 for p in prompts]


def test_yarn_through_hf_overrides(tiny_checkpoints, references, tmp_path):
    """vLLM's hf_overrides turns YaRN on for a checkpoint saved without it (Qwen2.5's long-context
    recipe): the plain Qwen2 checkpoint with the override gives the YaRN checkpoint's greedy ids
    (same weights: both written from seed 0); a bad override is refused naming it."""
    from pagedserve.errors import ValidationError
    from tests.helpers import write_tiny_checkpoint
    prompts, expected = references["qwen2_yarn"]
    assert write_tiny_checkpoint(str(tmp_path / "plain"), "qwen2")
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    llm = _llm(str(tmp_path / "plain"), skip_tokenizer_init=True, hf_overrides={"rope_scaling": yarn})
    assert _generate(llm, prompts) == expected
    llm.shutdown()
    with pytest.raises(ValidationError) as error:
        _llm(str(tmp_path / "plain"), skip_tokenizer_init=True, hf_overrides="{not json")
    assert error.value.param == "hf_overrides"


def test_every_architecture_builds_under_another_default_device(tiny_checkpoints):
    """The runner builds the model under its device as the default (CUDA on a GPU): every
    architecture builds with every parameter and buffer there (the meta device stands in for
    CUDA), nothing computed on one device meeting a tensor on another (YaRN's tables once did:
    no YaRN model could be built on a GPU)."""
    from pagedserve.engine_args import EngineArgs
    from pagedserve.models.registry import resolve_model_class
    for name, path in sorted(tiny_checkpoints.items()):
        config = EngineArgs(model=path, skip_tokenizer_init=True, device="cpu").create_config(offline=True)[0]
        with torch.device("meta"):
            model = resolve_model_class(config.model.architecture)(config.model)
        tensors = [*model.named_parameters(), *model.named_buffers()]
        assert tensors and all(t.device.type == "meta" for _, t in tensors), name
