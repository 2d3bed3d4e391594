"""Parallel sampling (n > 1) driven step by step through LLMEngine on a tiny random Llama:
the prompt is prefilled once and its blocks shared by ref count; the shared partial last
block is copied on first write (and the copy holds the source's KV); siblings sample
independently; every block is free at the end.

Block size 4, 32 blocks. A 10-token prompt fills blocks 0 and 1 and 2 of block 2:

    tokens  0..3 | 4..7 | 8 9 . .
    blocks   b0  |  b1  |  b2 (partial)
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from pagedserve import LLM, SamplingParams
from pagedserve.engine_io import SchedulerOutput

NUM_BLOCKS = 32
BLOCK_SIZE = 4
PROMPT = list(range(10, 20))   # 10 tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return str(path)


def make_llm(checkpoint: str, **kwargs) -> LLM:
    return LLM(model=checkpoint, device="cpu", dtype="float32", max_model_len=64, num_kv_blocks=NUM_BLOCKS,
               block_size=BLOCK_SIZE, skip_tokenizer_init=True, **kwargs)


@pytest.fixture
def llm(checkpoint):
    return make_llm(checkpoint)


class Recorder:
    """Keeps every SchedulerOutput the engine's scheduler hands out."""

    def __init__(self, llm: LLM) -> None:
        self.outputs: list[SchedulerOutput] = []
        scheduler = llm.engine.core.scheduler
        schedule = scheduler.schedule

        def recording() -> SchedulerOutput:
            so = schedule()
            self.outputs.append(so)
            return so
        scheduler.schedule = recording


def sampling(n: int = 4, **kwargs) -> SamplingParams:
    kwargs.setdefault("max_tokens", 6)
    return SamplingParams(n=n, temperature=1.0, seed=7, ignore_eos=True, **kwargs)


def run_to_end(llm: LLM) -> list:
    finished = []
    while llm.engine.has_unfinished_requests():
        finished += [o for o in llm.engine.step() if o.finished]
    return finished


def ref_counts(llm: LLM, count: int) -> list[int]:
    return [b.ref_cnt for b in llm.engine.core.kv_cache_manager.pool.blocks[:count]]


def test_prompt_blocks_shared_then_partial_block_copied_on_write(llm):
    engine, kv = llm.engine, llm.engine.core.kv_cache_manager
    recorder = Recorder(llm)
    engine.add_request("a", {"prompt_token_ids": PROMPT}, sampling())
    ids = engine.children["a"]
    assert ids == ["a-0", "a-1", "a-2", "a-3"]

    engine.step()   # prefill once; the siblings join and sample from the parent's logits
    first = recorder.outputs[-1]
    assert first.num_scheduled_tokens == {"a-0": 10, "a-1": 10, "a-2": 10, "a-3": 10}
    assert [r.req_id for r in first.new_requests] == ["a-0"]
    assert [f.req_id for f in first.forked_requests] == ["a-1", "a-2", "a-3"]
    assert first.blocks_to_copy == []
    assert [kv.block_ids(r) for r in ids] == [[0, 1, 2]] * 4
    assert ref_counts(llm, 4) == [4, 4, 4, 0]
    assert kv.pool.num_free_blocks == NUM_BLOCKS - 3

    engine.step()   # first decode: each writer of the shared partial block copies it first
    second = recorder.outputs[-1]
    assert second.total_num_scheduled_tokens == 4
    assert second.blocks_to_copy == [(2, 3), (2, 4), (2, 5)]   # the last writer keeps block 2
    assert [kv.block_ids(r) for r in ids] == [[0, 1, 3], [0, 1, 4], [0, 1, 5], [0, 1, 2]]
    assert ref_counts(llm, 7) == [4, 4, 1, 1, 1, 1, 0]
    assert kv.pending_copies == []
    # the runner was told which last block replaced which
    replaced = {c.req_id: c.replaced_last_block for c in second.cached_requests}
    assert replaced == {"a-0": 3, "a-1": 4, "a-2": 5, "a-3": None}

    # the copies hold the source's KV for the prompt's slots 8 and 9 (offsets 0, 1)
    for k_cache, v_cache in engine.core.executor.runner.kv_caches:
        assert k_cache[2, :2].abs().sum() > 0
        for dst in (3, 4, 5):
            assert torch.equal(k_cache[dst, :2], k_cache[2, :2])
            assert torch.equal(v_cache[dst, :2], v_cache[2, :2])
        # offset 2 is each sibling's own first sampled token: written after the copy
        assert not torch.equal(k_cache[3, 2], k_cache[4, 2])

    (output,) = run_to_end(llm)
    assert [c.index for c in output.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in output.outputs)
    assert len({tuple(c.token_ids) for c in output.outputs}) == 4   # independent draws
    assert kv.pool.num_free_blocks == NUM_BLOCKS
    assert ref_counts(llm, NUM_BLOCKS) == [0] * NUM_BLOCKS


def test_siblings_equal_single_requests_with_seed_plus_index(llm):
    """Sibling i samples as a lone request with seed + i would: the shared prompt KV and
    the copy-on-write block are exactly what a private prefill would have written."""
    (parallel,) = llm.generate({"prompt_token_ids": PROMPT}, sampling(max_tokens=8), use_tqdm=False)
    singles = [llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=1.0, seed=7 + i, max_tokens=8,
                                                                           ignore_eos=True), use_tqdm=False)[0]
               for i in range(4)]
    assert [c.token_ids for c in parallel.outputs] == [s.outputs[0].token_ids for s in singles]
    assert llm.engine.core.kv_cache_manager.pool.num_free_blocks == NUM_BLOCKS


def test_block_aligned_prompt_needs_no_copy(llm):
    engine, kv = llm.engine, llm.engine.core.kv_cache_manager
    recorder = Recorder(llm)
    engine.add_request("b", {"prompt_token_ids": PROMPT[:8]}, sampling())
    ids = engine.children["b"]
    engine.step()
    assert [kv.block_ids(r) for r in ids] == [[0, 1]] * 4
    assert ref_counts(llm, 3) == [4, 4, 0]
    engine.step()
    assert recorder.outputs[-1].blocks_to_copy == []
    assert [kv.block_ids(r) for r in ids] == [[0, 1, 2], [0, 1, 3], [0, 1, 4], [0, 1, 5]]
    assert ref_counts(llm, 7) == [4, 4, 1, 1, 1, 1, 0]
    run_to_end(llm)
    assert kv.pool.num_free_blocks == NUM_BLOCKS


def test_siblings_join_only_when_a_chunked_prompt_completes(checkpoint):
    llm = make_llm(checkpoint, max_num_batched_tokens=4)
    engine, kv = llm.engine, llm.engine.core.kv_cache_manager
    recorder = Recorder(llm)
    engine.add_request("c", {"prompt_token_ids": PROMPT}, sampling(max_tokens=3))
    ids = engine.children["c"]
    engine.step()
    engine.step()
    assert [kv.block_ids(r) for r in ids] == [[0, 1], [], [], []]
    assert all(so.forked_requests == [] for so in recorder.outputs)
    engine.step()   # the last 2 prompt tokens: now the siblings fork
    assert recorder.outputs[-1].num_scheduled_tokens == {"c-0": 2, "c-1": 2, "c-2": 2, "c-3": 2}
    assert [kv.block_ids(r) for r in ids] == [[0, 1, 2]] * 4
    assert ref_counts(llm, 3) == [4, 4, 4]
    (output,) = run_to_end(llm)
    assert [len(c.token_ids) for c in output.outputs] == [3, 3, 3, 3]
    assert kv.pool.num_free_blocks == NUM_BLOCKS


def test_abort_frees_every_sibling(llm):
    engine, kv = llm.engine, llm.engine.core.kv_cache_manager
    engine.add_request("d", {"prompt_token_ids": PROMPT}, sampling(max_tokens=20))
    engine.step()
    engine.step()
    assert kv.pool.num_free_blocks == NUM_BLOCKS - 6
    output = engine.abort_request("d")
    assert output.finished and [c.finish_reason for c in output.outputs] == ["abort"] * 4
    assert kv.pool.num_free_blocks == NUM_BLOCKS
    assert not engine.has_unfinished_requests()


def test_abort_before_the_fork_frees_the_waiting_siblings(checkpoint):
    llm = make_llm(checkpoint, max_num_batched_tokens=4)
    engine, kv = llm.engine, llm.engine.core.kv_cache_manager
    engine.add_request("e", {"prompt_token_ids": PROMPT}, sampling())
    engine.step()   # first prompt chunk only
    engine.abort_request("e")
    assert kv.pool.num_free_blocks == NUM_BLOCKS
    assert engine.core.scheduler.requests == {} and engine.core.scheduler.pending_forks == {}
    assert not engine.has_unfinished_requests()


def test_best_of_returns_the_n_best_by_cumulative_logprob(llm):
    params = SamplingParams(n=2, best_of=5, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True)
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)
    candidates = [llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        temperature=1.0, seed=3 + i, max_tokens=5, ignore_eos=True, logprobs=0), use_tqdm=False)[0].outputs[0]
        for i in range(5)]
    best = sorted(candidates, key=lambda c: c.cumulative_logprob, reverse=True)[:2]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in best]   # best first
    assert [c.index for c in out.outputs] == [0, 1]
    assert out.outputs[0].cumulative_logprob is None and out.outputs[0].logprobs is None   # not asked for
    assert llm.engine.core.kv_cache_manager.pool.num_free_blocks == NUM_BLOCKS
    with_logprobs = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(
        n=2, best_of=5, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True, logprobs=1), use_tqdm=False)[0]
    cumulative = [c.cumulative_logprob for c in with_logprobs.outputs]
    assert cumulative == pytest.approx([c.cumulative_logprob for c in best], abs=1e-5)
    assert cumulative[0] >= cumulative[1]


def test_best_of_reports_nothing_until_every_candidate_is_done():
    from pagedserve.core.engine_core import EngineCoreOutput
    from pagedserve.frontend.output_processor import OutputKind, OutputProcessor

    processor = OutputProcessor(tokenizer=None)
    params = SamplingParams(n=2, best_of=3, logprobs=0)
    processor.add_request("r", ["r-0", "r-1", "r-2"], None, [1, 2], params, OutputKind.DELTA,
                          report_logprobs=False)

    def step(req_id, token, logprob, finish=None):
        return EngineCoreOutput(req_id, [token], finish, None, ([token], [logprob], 1))

    results, _ = processor.process_outputs([step("r-0", 5, -1.0), step("r-1", 6, -0.5, "length"),
                                            step("r-2", 7, -0.1)])
    assert results == []
    results, _ = processor.process_outputs([step("r-0", 8, -0.2, "length"), step("r-2", 9, -2.0, "length")])
    (output,) = results
    assert output.finished
    # cumulative: r-0 -1.2, r-1 -0.5, r-2 -2.1 -> r-1 then r-0, numbered 0, 1
    assert [(c.index, c.token_ids, c.finish_reason) for c in output.outputs] == [(0, [6], "length"),
                                                                                (1, [5, 8], "length")]
    assert [c.cumulative_logprob for c in output.outputs] == [None, None]
    assert not processor.has_unfinished()
