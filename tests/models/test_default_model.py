"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF): pagedserve and
transformers load the same GGUF, and greedy ids must be identical."""
from __future__ import annotations

import os

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.models.default_model import default_model_path
from tests.helpers import TEST_DEVICE

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The three primary colors are",
           "Water boils at", "My favorite food is", "In 1492, Columbus", "The largest planet in the solar system is",
           "Hello, my name is", "To make a cake, you need"]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM
    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).to(TEST_DEVICE).eval()


@pytest.fixture(scope="module")
def llm():
    return LLM(device=TEST_DEVICE, dtype="float32")


def test_greedy_ids_equal_transformers(llm, hf_model):
    tokenizer = llm.get_tokenizer()
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(TEST_DEVICE)
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=NEW_TOKENS)[0, ids.shape[1]:].tolist()
        assert out.outputs[0].token_ids == ref, prompt
        # EOS ends the sequence with finish_reason "stop" and no stop_reason, as vLLM reports it
        expected_reason = "stop" if ref[-1] in llm.engine.eos_token_ids else "length"
        assert out.outputs[0].finish_reason == expected_reason
        assert out.outputs[0].text == tokenizer.decode(ref, skip_special_tokens=True)


def test_capital_of_france(llm):
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=20, temperature=0), use_tqdm=False)
    assert out[0].outputs[0].text.startswith(" Paris")


def test_allowed_token_ids_greedy_equals_transformers_prefix_allowed_tokens(llm, hf_model):
    """vLLM's allowed_token_ids: the greedy ids equal transformers' generate restricted by
    prefix_allowed_tokens_fn to the same set, in a batch beside an unrestricted request (which
    keeps its own greedy ids)."""
    tokenizer = llm.get_tokenizer()
    allowed = sorted({t for word in (" Paris", " London", " the", " is", " a", ",", ".") for t in
                      tokenizer(word, add_special_tokens=False).input_ids})
    restricted, free = llm.generate(PROMPTS[:2], [SamplingParams(max_tokens=12, temperature=0.0, allowed_token_ids=allowed),
                                                  SamplingParams(max_tokens=12, temperature=0.0)], use_tqdm=False)
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids.to(TEST_DEVICE)
    with torch.no_grad():
        ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                prefix_allowed_tokens_fn=lambda batch, sent: allowed)[0, ids.shape[1]:].tolist()
    assert restricted.outputs[0].token_ids == ref and set(ref) <= set(allowed)
    alone = llm.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)[0]
    assert free.outputs[0].token_ids == alone.outputs[0].token_ids
