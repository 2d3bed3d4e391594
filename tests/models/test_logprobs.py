"""logprobs and prompt_logprobs against log_softmax of transformers' logits for the default
model (fp32, CPU), within 1e-4: the sampled token's logprob and rank, the top-k ids and
values, and every prompt position. Logprobs are the model's raw distribution (vLLM's
default), so temperature, penalties and logit_bias do not change them.
"""
from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.models.default_model import default_model_path

ATOL = 1e-4
PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived"]


@pytest.fixture(scope="module")
def llm():
    engine = LLM(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64, seed=0)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def reference():
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


def ref_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), V]: row i is the distribution of token i + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    return logits.log_softmax(-1)


def check_position(entry: dict, actual: int, ref_row: torch.Tensor, k: int, llm: LLM) -> None:
    """One position's dict: the actual token, then the top-k, each close to the reference."""
    top_lp, top_ids = ref_row.topk(k)
    assert actual in entry
    assert entry[actual].logprob == pytest.approx(ref_row[actual].item(), abs=ATOL)
    assert entry[actual].rank == int((ref_row > ref_row[actual]).sum()) + 1
    for rank, (tid, lp) in enumerate(zip(top_ids.tolist(), top_lp.tolist()), start=1):
        assert entry[tid].logprob == pytest.approx(lp, abs=ATOL)
        assert entry[tid].rank == rank
        assert entry[tid].decoded_token == llm.get_tokenizer().decode([tid])
    assert set(entry) == set(top_ids.tolist()) | {actual}


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, prompt_logprobs=3),
    # processing changes the draw, never the reported (raw) logprobs
    SamplingParams(temperature=0.7, top_k=20, repetition_penalty=1.3, logit_bias={11: 3.0}, seed=3,
                   max_tokens=8, ignore_eos=True, logprobs=4, prompt_logprobs=0),
], ids=["greedy", "sampled"])
def test_logprobs_match_transformers(llm, reference, params):
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for out in outputs:
        c = out.outputs[0]
        ids = out.prompt_token_ids + c.token_ids
        ref = ref_logprobs(reference, ids)
        n_prompt = len(out.prompt_token_ids)
        assert len(c.logprobs) == len(c.token_ids) == 8
        for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            check_position(entry, token, ref[n_prompt - 1 + i], params.logprobs, llm)
            if params.temperature == 0.0:
                assert entry[token].rank == 1
        cumulative = sum(entry[token].logprob for token, entry in zip(c.token_ids, c.logprobs))
        assert c.cumulative_logprob == pytest.approx(cumulative, abs=1e-6)
        assert c.cumulative_logprob == pytest.approx(
            sum(ref[n_prompt - 1 + i, t].item() for i, t in enumerate(c.token_ids)), abs=8 * ATOL)
        # prompt: None for the first token, then one dict per prompt token
        assert len(out.prompt_logprobs) == n_prompt and out.prompt_logprobs[0] is None
        for j in range(1, n_prompt):
            entry = out.prompt_logprobs[j]
            if params.prompt_logprobs == 0:
                assert list(entry) == [out.prompt_token_ids[j]]
                assert entry[out.prompt_token_ids[j]].logprob == pytest.approx(
                    ref[j - 1, out.prompt_token_ids[j]].item(), abs=ATOL)
            else:
                check_position(entry, out.prompt_token_ids[j], ref[j - 1], params.prompt_logprobs, llm)


def test_prompt_logprobs_over_a_chunked_prefill(reference):
    chunked = LLM(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=5,
                  block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2, logprobs=1)
    (out,) = chunked.generate(PROMPTS[1], params, use_tqdm=False)
    ref = ref_logprobs(reference, out.prompt_token_ids + out.outputs[0].token_ids)
    assert len(out.prompt_token_ids) > 10   # several chunks of 5
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids) and out.prompt_logprobs[0] is None
    for j in range(1, len(out.prompt_token_ids)):
        check_position(out.prompt_logprobs[j], out.prompt_token_ids[j], ref[j - 1], 2, chunked)
    for i, (token, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        check_position(entry, token, ref[len(out.prompt_token_ids) - 1 + i], 1, chunked)
    chunked.shutdown()


def test_no_logprobs_unless_asked(llm):
    (out,) = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    assert out.outputs[0].logprobs is None and out.outputs[0].cumulative_logprob is None
    assert out.prompt_logprobs is None


def test_logprobs_zero_is_the_sampled_token_only(llm, reference):
    (out,) = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, seed=1, max_tokens=4, logprobs=0),
                          use_tqdm=False)
    c = out.outputs[0]
    ref = ref_logprobs(reference, out.prompt_token_ids + c.token_ids)
    for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        assert list(entry) == [token]
        assert entry[token].logprob == pytest.approx(ref[len(out.prompt_token_ids) - 1 + i, token].item(), abs=ATOL)


def test_too_many_logprobs_is_a_validation_error(llm):
    from pagedserve.errors import ValidationError
    for field in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValidationError) as info:
            llm.generate(PROMPTS[0], SamplingParams(**{field: 21}), use_tqdm=False)
        assert info.value.param == field
