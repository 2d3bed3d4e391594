"""ModelRunner on CPU, driven by hand-built SchedulerOutputs (no scheduler, no engine): a new
request's prefill, a chunked prefill, decode steps from cached-request diffs, a new block,
a finished request and a preempted one resumed in full. Sampled ids are checked against
transformers' greedy generate on the same tiny random Llama; block tables against the
exact block ids sent.

Block size 4. Request "a": a 7-token prompt in blocks [5, 2], later [5, 2, 11]; request "b":
a 6-token prompt in block [9, 3], prefilled in chunks of 4 and 2.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.engine_args import EngineArgs
from pagedserve.engine_io import (CachedRequestData, ModelRunnerOutput, NewRequestData, RequestId, SchedulerOutput,
                                  TokenLogprobs)
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.model_runner import ModelRunner
from tests.helpers import hf_greedy, random_prompts, write_tiny_checkpoint

BLOCK_SIZE = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
A, B = RequestId("a"), RequestId("b")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("runner") / "llama"), "llama")


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture
def runner(checkpoint) -> ModelRunner:
    config, _, _ = EngineArgs(model=checkpoint, device="cpu", dtype="float32", max_model_len=64,
                              block_size=BLOCK_SIZE, num_kv_blocks=16, skip_tokenizer_init=True).create_config()
    runner = ModelRunner(config.model, config.cache, config.scheduler, config.device, config.weights,
                         torch.device("cpu"))
    runner.load_model()
    runner.init_kv_cache(16)
    runner.finish_setup()
    return runner


def step(runner: ModelRunner, scheduled: dict[str, int], **parts) -> ModelRunnerOutput:
    so = SchedulerOutput(num_scheduled_tokens=scheduled, total_num_scheduled_tokens=sum(scheduled.values()), **parts)
    out = runner.execute_model(so)
    assert isinstance(out, ModelRunnerOutput)
    return out


def blocks_of(runner: ModelRunner, rid: str) -> list[int]:
    state = runner.states[rid]
    return runner.block_table.array[state.block_row, :len(state.block_ids)].tolist()


def test_prefill_decode_finish_and_preempt(runner, hf_model):
    prompt_a, prompt_b = random_prompts(2, 512, 6, 7, seed=5)
    prompt_a, prompt_b = (prompt_a + [7])[:7], (prompt_b + [8])[:6]
    want_a, want_b = hf_greedy(hf_model, prompt_a, 4), hf_greedy(hf_model, prompt_b, 1)
    params_b = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)

    # step 1: a's whole prompt; b's first chunk (4 of 6 tokens: nothing to sample yet)
    out = step(runner, {A: 7, B: 4}, new_requests=[
        NewRequestData(A, prompt_a, 7, GREEDY, [5, 2], 0),
        NewRequestData(B, prompt_b, 6, params_b, [9, 3], 0)])
    assert out.sampled_token_ids == {A: want_a[0]}
    assert blocks_of(runner, A) == [5, 2] and blocks_of(runner, B) == [9, 3]
    assert runner.states[A].token_ids == prompt_a + [want_a[0]]
    assert runner.states[B].num_computed_tokens == 4

    # step 2: a decodes (the diff carries no new block); b's last chunk samples, with logprobs
    out = step(runner, {A: 1, B: 2}, cached_requests=[
        CachedRequestData(A, [], 7, None, 8, want_a[0]),
        CachedRequestData(B, [], 4, None, 6, None)])
    assert out.sampled_token_ids == {A: want_a[1], B: want_b[0]}
    lp = out.logprobs[B]
    assert isinstance(lp, TokenLogprobs) and A not in out.logprobs
    assert lp.token_ids[0] == want_b[0] and len(lp.token_ids) == len(lp.logprobs) == 3
    assert lp.rank == 1 and lp.logprobs[0] == pytest.approx(max(lp.logprobs))

    # step 3: b finished (its state and block-table row are dropped); a's position 8 opens block 11
    row_b = runner.states[B].block_row
    out = step(runner, {A: 1}, finished_req_ids={B}, cached_requests=[
        CachedRequestData(A, [11], 8, None, 9, want_a[1])])
    assert out.sampled_token_ids == {A: want_a[2]}
    assert B not in runner.states and runner.block_table.array[row_b].tolist() == [0] * runner.block_table.array.shape[1]
    assert blocks_of(runner, A) == [5, 2, 11]
    assert runner.states[A].num_computed_tokens == 9

    # step 4: a preempted (state dropped, nothing scheduled), then resumed in full in new blocks
    out = step(runner, {}, preempted_req_ids={A})
    assert out.sampled_token_ids == {} and A not in runner.states
    tokens = prompt_a + want_a[:3]
    out = step(runner, {A: len(tokens)}, new_requests=[NewRequestData(A, tokens, 7, GREEDY, [4, 6, 8], 0)])
    assert out.sampled_token_ids == {A: want_a[3]}
    assert blocks_of(runner, A) == [4, 6, 8]
    assert runner.states[A].token_ids == prompt_a + want_a


def test_prompt_logprobs_are_named(runner, hf_model):
    prompt = list(range(20, 29))   # 9 tokens
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=1)
    out = step(runner, {A: 9}, new_requests=[NewRequestData(A, prompt, 9, params, [1, 2, 3], 0)])
    entries = out.prompt_logprobs[A]
    assert len(entries) == 8   # positions 0..7 predict prompt tokens 1..8
    with torch.no_grad():
        reference = hf_model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    for pos, entry in enumerate(entries):
        assert isinstance(entry, TokenLogprobs)
        assert entry.token_ids[0] == prompt[pos + 1]
        assert entry.logprobs[0] == pytest.approx(reference[pos, prompt[pos + 1]].item(), abs=1e-4)
    assert out.sampled_token_ids == {A: int(reference[-1].argmax())}


def test_prompt_logprobs_are_computed_a_bounded_chunk_of_positions_at_a_time(runner, hf_model, monkeypatch):
    """The LM head and fp32 log-softmax of prompt_logprobs run SAMPLER_CHUNK_ROWS positions at a
    time (the sampler's profiled working set; a whole chunk's is GBs on a large vocabulary), with
    the same entries as one pass."""
    from pagedserve.worker import prompt_logprobs
    monkeypatch.setattr(prompt_logprobs, "SAMPLER_CHUNK_ROWS", 3)
    seen = []
    real = runner.model.compute_logits
    monkeypatch.setattr(runner.model, "compute_logits", lambda h: seen.append(h.shape[0]) or real(h))
    prompt = list(range(30, 41))   # 11 tokens: positions 0..9 predict tokens 1..10
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    out = step(runner, {A: 11}, new_requests=[NewRequestData(A, prompt, 11, params, [1, 2, 3], 0)])
    assert seen[1:] == [3, 3, 3, 1]   # after the step's sampled row: 10 positions in chunks of 3
    with torch.no_grad():
        reference = hf_model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    entries = out.prompt_logprobs[A]
    assert [entry.token_ids[0] for entry in entries] == prompt[1:]
    for pos, entry in enumerate(entries):
        assert entry.token_ids[1:] == reference[pos].topk(2).indices.tolist()
        assert entry.logprobs[0] == pytest.approx(reference[pos, prompt[pos + 1]].item(), abs=1e-4)


@pytest.mark.parametrize("max_model_len, prepared", [(4096, True), (2048, False)])
def test_set_up_prepares_fa4_only_for_long_contexts(checkpoint, max_model_len: int, prepared: bool) -> None:
    """The runner's set-up asks the layers' backend to compile FlashAttention-4's prefill kernel, with the
    layers' dtype, heads and head dim, only where max_model_len reaches fa4_prefill.MIN_MODEL_LEN (an
    engine of 2048 never pays its import and compile)."""
    config, _, _ = EngineArgs(model=checkpoint, device="cpu", dtype="float32", max_model_len=max_model_len,
                              allow_long_max_model_len=True, block_size=BLOCK_SIZE, num_kv_blocks=16,
                              skip_tokenizer_init=True).create_config()
    runner = ModelRunner(config.model, config.cache, config.scheduler, config.device, config.weights,
                         torch.device("cpu"))
    runner.load_model()
    runner.init_kv_cache(16)
    calls = []

    class Backend:   # stands in for TritonBackend (CPU runs the torch reference, which has no FA4)
        def prepare_fa4(self, *args):
            calls.append(args)
            return True

    layers = runner.model.attention_layers()
    for layer in layers:
        layer.backend = Backend() if layer is layers[0] else layer.backend
    runner._prepare_fa4()
    layer = layers[0]
    expected = [(torch.float32, layer.num_heads, layer.num_kv_heads, layer.head_dim, torch.device("cpu"))]
    assert calls == (expected if prepared else [])
