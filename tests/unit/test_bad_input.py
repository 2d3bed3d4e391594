"""Bad input gets a clear error naming the parameter, and the engine keeps serving."""
from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams, ValidationError


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return LLM(model=tiny_checkpoints["llama"], device="cpu", dtype="float32", max_model_len=64,
               skip_tokenizer_init=True)


def ok(llm: LLM) -> None:
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    pool = llm.engine.core.kv_cache_manager.pool
    assert pool.num_free_blocks == pool.num_blocks


@pytest.mark.parametrize("prompts,param", [([], "prompts"), ({"prompt_token_ids": []}, "prompt"),
                                           ({"prompt_token_ids": [1, 99999]}, "prompt"),
                                           ({"prompt_token_ids": list(range(64))}, "prompt"),
                                           ({"text": "x"}, "prompt"), (3.5, "prompt"),
                                           ("text without a tokenizer", "prompt")])
def test_bad_prompts(llm, prompts, param):
    with pytest.raises(ValidationError) as err:
        llm.generate(prompts, use_tqdm=False)
    assert err.value.param == param
    ok(llm)


def test_prompt_over_max_model_len_message(llm):
    with pytest.raises(ValidationError, match="max_model_len is 64"):
        llm.generate({"prompt_token_ids": [1] * 100}, use_tqdm=False)


def test_bad_prompt_in_a_batch_queues_nothing(llm):
    with pytest.raises(ValidationError):
        llm.generate([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [1] * 80}], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    ok(llm)


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n"),
    (dict(min_p=2.0), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(logprobs=-2), "logprobs"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(best_of=1, n=2), "best_of"),
])
def test_invalid_sampling_values(kwargs, param):
    with pytest.raises(ValidationError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param
    assert param in str(err.value)


def test_model_dependent_sampling_values(llm):
    for params, param in ((SamplingParams(logit_bias={100000: 1.0}), "logit_bias"),
                          (SamplingParams(stop_token_ids=[100000]), "stop_token_ids"),
                          (SamplingParams(logprobs=50), "logprobs")):
        with pytest.raises(ValidationError) as err:
            llm.generate({"prompt_token_ids": [1, 2]}, params, use_tqdm=False)
        assert err.value.param == param
    ok(llm)


def test_unsupported_engine_features_are_rejected(tiny_checkpoints):
    with pytest.raises(ValidationError) as err:
        LLM(model=tiny_checkpoints["llama"], device="cpu", quantization="exl2")
    assert err.value.param == "quantization" and "not supported" in str(err.value)
    with pytest.raises(ValidationError) as err:
        LLM(model=tiny_checkpoints["llama"], device="cpu", no_such_option=1)
    assert err.value.param == "no_such_option"
    with pytest.raises(ValidationError) as err:
        LLM(model=tiny_checkpoints["llama"], device="cpu", block_size=12)
    assert err.value.param == "block_size"


def test_partial_rotary_is_refused_not_computed_wrong(tmp_path):
    """Phi-4-mini's partial_rotary_factor 0.75 (rotary over part of each head) would run as full
    rotary and give other tokens: refused, naming rope_scaling."""
    from transformers import AutoModelForCausalLM, Phi3Config
    config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                        partial_rotary_factor=0.75, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValidationError) as err:
        LLM(model=str(tmp_path), device="cpu", skip_tokenizer_init=True)
    assert err.value.param == "rope_scaling" and "partial_rotary_factor 0.75" in str(err.value)


def test_kv_cache_smaller_than_max_model_len(tiny_checkpoints):
    with pytest.raises(ValidationError) as err:
        LLM(model=tiny_checkpoints["llama"], device="cpu", max_model_len=128, num_kv_blocks=4, block_size=16,
            skip_tokenizer_init=True)
    assert "max_model_len" in str(err.value)


def test_wrong_number_of_sampling_params(llm):
    with pytest.raises(ValidationError) as err:
        llm.generate([{"prompt_token_ids": [1]}, {"prompt_token_ids": [2]}], [SamplingParams()], use_tqdm=False)
    assert err.value.param == "sampling_params"
