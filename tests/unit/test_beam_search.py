"""Beam search (frontend/beam_search.py, LLM.beam_search): exact beams against transformers'
beam search on a tiny random Llama with no end-of-sequence token (where vLLM's and
transformers' searches are the same search), the search's rules on hand-made steps (ended
beams, length penalty, include_stop_str_in_output, ignore_eos), and its limits. Over HTTP:
tests/server/test_beam_search.py."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, BeamSearchParams, SamplingParams
from pagedserve.errors import ValidationError
from pagedserve.frontend.beam_search import BeamSearch, from_sampling_params
from pagedserve.outputs import Logprob
from tests.helpers import random_prompts

WIDTH, STEPS = 3, 8


def test_beams_match_transformers_beam_search(tiny_checkpoints) -> None:
    checkpoint = tiny_checkpoints["llama"]
    prompts = random_prompts(3, 512, 5, 12, seed=1)
    llm = LLM(model=checkpoint, device="cpu", dtype="float32", max_model_len=64, num_kv_blocks=64, block_size=4,
              skip_tokenizer_init=True)
    try:
        outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts],
                                  BeamSearchParams(beam_width=WIDTH, max_tokens=STEPS))
    finally:
        llm.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        reference = hf.generate(torch.tensor([prompt]), num_beams=WIDTH, num_return_sequences=WIDTH, do_sample=False,
                                max_new_tokens=STEPS, length_penalty=1.0, early_stopping=False,
                                output_scores=True, return_dict_in_generate=True)
        assert [s.tokens for s in output.sequences] == reference.sequences.tolist()
        # transformers' score is the sum over the generated length; vLLM's (ours) is the sum
        for sequence, score in zip(output.sequences, reference.sequences_scores.tolist()):
            assert sequence.cum_logprob == pytest.approx(score * STEPS, rel=1e-4)
            assert sequence.finish_reason == "length" and sequence.text is None   # no tokenizer


def _lp(pairs: dict[int, float]) -> dict[int, Logprob]:
    return {token: Logprob(value, rank) for rank, (token, value) in enumerate(pairs.items(), start=1)}


def _search(length_penalty: float = 1.0, include_eos: bool = False, ignore_eos: bool = False) -> BeamSearch:
    """Prompt [1, 2], width 2, end-of-sequence 9, two hand-made steps:
    step 1 from [1 2]: 5 -0.1, 9 -0.5 (ends [1 2] at -0.5), 6 -1.0, 7 -2.0 -> beams [1 2 5] -0.1, [1 2 6] -1.0
    step 2: [1 2 5]: 9 -0.2 (ends it at -0.3), 5 -3.0; [1 2 6]: 8 -0.1, 9 -4.0 (ends it at -5.0)
            -> beams [1 2 6 8] -1.1, [1 2 5 5] -3.1"""
    search = BeamSearch([1, 2], BeamSearchParams(2, 2, ignore_eos, 0.0, length_penalty, include_eos), (9,))
    search.advance([_lp({5: -0.1, 9: -0.5, 6: -1.0, 7: -2.0})])
    search.advance([_lp({9: -0.2, 5: -3.0}), _lp({8: -0.1, 9: -4.0})])
    assert search.done
    return search


def test_ended_beams_compete_by_length_normalised_score() -> None:
    search = _search()
    assert [(b.tokens, b.cum_logprob) for b in search.beams] == [([1, 2, 6, 8], pytest.approx(-1.1)),
                                                                 ([1, 2, 5, 5], pytest.approx(-3.1))]
    # scores (length counts the prompt, as vLLM's): [1 2 5] -0.3/3, [1 2] -0.5/2, [1 2 6 8] -1.1/4, ...
    best = search.best()
    assert [(b.tokens, b.finish_reason) for b in best] == [([1, 2, 5], "stop"), ([1, 2], "stop")]
    output = search.request_output("r", "p", lambda ids: " ".join(map(str, ids)), num_logprobs=1)
    assert [(c.index, c.text, c.token_ids, c.finish_reason) for c in output.outputs] == \
        [(0, "5", [5], "stop"), (1, "", [], "stop")]
    assert output.outputs[0].cumulative_logprob == pytest.approx(-0.3)
    assert output.prompt_token_ids == [1, 2] and output.finished
    # length_penalty 2 favours the longer live beam over the shorter ended one; 0 ranks by sum alone
    assert [b.tokens for b in _search(length_penalty=2.0).best()] == [[1, 2, 5], [1, 2, 6, 8]]
    assert [b.tokens for b in _search(length_penalty=0.0).best()] == [[1, 2, 5], [1, 2]]


def test_eos_token_kept_when_asked_and_ordinary_under_ignore_eos() -> None:
    search = _search(include_eos=True)
    best = search.best()
    assert [b.tokens for b in best] == [[1, 2, 5, 9], [1, 2, 9]]   # same scores: the token is not counted
    output = search.request_output("r", None, lambda ids: ",".join(map(str, ids)))
    assert [(c.token_ids, c.text) for c in output.outputs] == [([5, 9], "5"), ([9], "")]   # not in the text
    ignoring = _search(ignore_eos=True)
    assert not ignoring.completed
    # step 1 keeps [1 2 5] -0.1 and [1 2 9] -0.5; step 2's dicts then extend those two
    assert [(b.tokens, b.cum_logprob) for b in ignoring.beams] == [([1, 2, 5, 9], pytest.approx(-0.3)),
                                                                   ([1, 2, 9, 8], pytest.approx(-0.6))]


def test_fewer_candidates_than_the_width_and_no_beam_left() -> None:
    search = BeamSearch([3], BeamSearchParams(4, 5), (9,))
    search.advance([_lp({9: -0.1, 4: -0.2})])
    assert [b.tokens for b in search.beams] == [[3, 4]] and not search.done
    search.advance([_lp({9: -0.3})])
    assert search.beams == [] and search.done and search.steps == 2
    # [3] -0.1 / 1 beats [3 4] -0.5 / 2
    assert [(b.tokens, b.finish_reason) for b in search.best()] == [([3], "stop"), ([3, 4], "stop")]


def test_limits_and_refused_fields(tiny_checkpoints) -> None:
    with pytest.raises(ValidationError) as info:
        BeamSearchParams(beam_width=0, max_tokens=4)
    assert info.value.param == "beam_width"
    llm = LLM(model=tiny_checkpoints["llama"], device="cpu", dtype="float32", max_model_len=32, num_kv_blocks=32,
              skip_tokenizer_init=True)
    try:
        with pytest.raises(ValidationError) as info:   # 2 * 11 logprobs a step > max_logprobs 20
            llm.beam_search([{"prompt_token_ids": [1, 2, 3]}], BeamSearchParams(beam_width=11, max_tokens=2))
        assert info.value.param == "beam_width"
        with pytest.raises(ValidationError) as info:
            llm.beam_search([{"prompt_token_ids": [1, 2, 3]}], BeamSearchParams(beam_width=2, max_tokens=30))
        assert info.value.param == "max_tokens"
        assert not llm.engine.has_unfinished_requests()
    finally:
        llm.shutdown()
    for params, param in [(SamplingParams(n=2, stop=["x"]), "stop"), (SamplingParams(n=2, min_tokens=1), "min_tokens"),
                          (SamplingParams(n=2, repetition_penalty=1.2), "repetition_penalty"),
                          (SamplingParams(n=2, best_of=3), "best_of")]:
        with pytest.raises(ValidationError) as info:
            from_sampling_params(params, 1.0, 4)
        assert info.value.param == param
    beam = from_sampling_params(SamplingParams(n=3, ignore_eos=True, include_stop_str_in_output=True), 0.5, 7)
    assert beam == BeamSearchParams(3, 7, True, 1.0, 0.5, True)
