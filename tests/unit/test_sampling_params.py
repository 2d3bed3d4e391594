"""SamplingParams: every field validated at construction, the error naming the field;
normalisations (top_k -1, stop as a string, logit_bias keys) exactly as vLLM does them."""
from __future__ import annotations

import math

import pytest

from pagedserve.errors import ValidationError
from pagedserve.sampling_params import SamplingParams

BAD_VALUES = [
    ("n", 0), ("n", -1), ("n", 1.5),
    ("best_of", 0), ("temperature", -0.1), ("temperature", math.nan),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan),
    ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.01), ("min_p", 1.5),
    ("typical_p", 0.0), ("typical_p", 1.2),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.01), ("presence_penalty", -2.5),
    ("frequency_penalty", 2.5), ("frequency_penalty", -2.01),
    ("max_tokens", 0), ("max_tokens", -5),
    ("min_tokens", -1),
    ("logprobs", -2), ("prompt_logprobs", -2), ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", True),
    ("seed", 1.5), ("seed", "42"),
    ("stop", [""]), ("stop", ["ok", 3]),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["2"]),
    ("logit_bias", {5: 101.0}), ("logit_bias", {5: -100.5}), ("logit_bias", {-1: 1.0}),
]


@pytest.mark.parametrize("field,value", BAD_VALUES)
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field


@pytest.mark.parametrize("field,value", [
    ("temperature", "hot"), ("top_p", "high"), ("top_k", "5"), ("n", "2"), ("max_tokens", "9"),
    ("presence_penalty", None), ("logprobs", "3"), ("logit_bias", {"x": 1.0}), ("logit_bias", {3: "big"}),
    ("stop", 5), ("stop_token_ids", 5), ("stop_token_ids", "12"),
])
def test_wrong_type_is_a_validation_error_not_a_type_error(field, value):
    with pytest.raises(ValidationError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field


def test_cross_field_checks():
    with pytest.raises(ValidationError) as info:
        SamplingParams(n=3, best_of=2)
    assert info.value.param == "best_of"
    with pytest.raises(ValidationError) as info:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert info.value.param == "min_tokens"
    with pytest.raises(ValidationError) as info:
        SamplingParams(stop=["x"], detokenize=False)
    assert info.value.param == "detokenize"


def test_edges_that_are_valid():
    p = SamplingParams(n=2, best_of=2, temperature=0.0, top_p=1.0, top_k=1, min_p=1.0, typical_p=1.0,
                       presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=0.01, max_tokens=1,
                       min_tokens=1, logprobs=0, prompt_logprobs=0, seed=0, logit_bias={0: -100.0, 5: 100.0},
                       stop_token_ids=[0])
    assert p.temperature == 0.0 and p.min_tokens == 1 and p.logprobs == 0
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (1, None, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs, p.seed) == (16, 0, None, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None
    assert (p.ignore_eos, p.include_stop_str_in_output, p.skip_special_tokens,
            p.spaces_between_special_tokens, p.detokenize) == (False, False, True, True, True)
    assert not p.is_plain_greedy


def test_normalisations():
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    # OpenAI sends logit_bias keys as strings
    assert SamplingParams(logit_bias={"17": 2, 3: -1}).logit_bias == {17: 2.0, 3: -1.0}
    assert SamplingParams(temperature=1e-6).is_plain_greedy


def test_clone_is_deep():
    p = SamplingParams(stop=["a"], logit_bias={1: 1.0})
    q = p.clone()
    q.stop.append("b")
    q.logit_bias[2] = 2.0
    q.seed = 5
    assert p.stop == ["a"] and p.logit_bias == {1: 1.0} and p.seed is None
