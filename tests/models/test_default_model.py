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


@pytest.fixture(scope="module", params=[False, True], ids=["lockstep", "async"])
def scheduled_llm(request):
    engine = LLM(device=TEST_DEVICE, dtype="float32", max_model_len=256, num_kv_blocks=128,
                 async_scheduling=request.param)
    assert engine.engine.core.async_scheduling == request.param
    yield engine
    engine.shutdown()


def _contains(ids: list[int], sequence: list[int]) -> bool:
    return any(ids[i:i + len(sequence)] == sequence for i in range(len(ids) - len(sequence) + 1))


BAD_WORDS = {"Paris": ["Paris"], "answer is": ["answer is"], "both": ["Paris", "answer is"]}
BAD_WORDS_TOKENS = 16


@pytest.fixture(scope="module")
def bad_words_references(hf_model):
    """transformers' greedy ids for PROMPTS[0]: plain, and under bad_words_ids for each entry of
    BAD_WORDS (each word's tokens as written and with a leading space); with those sequences."""
    from transformers import AutoTokenizer
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids.to(TEST_DEVICE)
    refs = {}
    for name, words in (("plain", []), *BAD_WORDS.items()):
        sequences = [tokenizer.encode(text, add_special_tokens=False) for word in words for text in (word, " " + word)]
        with torch.no_grad():
            refs[name] = sequences, hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=BAD_WORDS_TOKENS,
                bad_words_ids=sequences or None)[0, ids.shape[1]:].tolist()
    return refs


def test_bad_words_greedy_equals_transformers_bad_words_ids(scheduled_llm, bad_words_references):
    """vLLM's bad_words, in lockstep and with async scheduling: greedy on "The capital of France
    is" gives " Paris" ... " answer is"; banning "Paris" (one token, both spellings) or "answer is"
    (" is" only right after " answer") gives transformers' greedy ids under bad_words_ids of the
    same sequences (each word as written and with a leading space), in one batch beside a plain
    request, which keeps its own ids. "is Paris" bans nothing here: " is" ends the prompt, and
    vLLM matches bad words against the output only (transformers would ban " Paris")."""
    greedy = dict(max_tokens=BAD_WORDS_TOKENS, temperature=0.0)
    params = [SamplingParams(**greedy), *(SamplingParams(**greedy, bad_words=w) for w in BAD_WORDS.values()),
              SamplingParams(**greedy, bad_words=["is Paris"])]
    outs = [o.outputs[0].token_ids for o in scheduled_llm.generate([PROMPTS[0]] * len(params), params,
                                                                   use_tqdm=False)]
    plain = bad_words_references["plain"][1]
    assert outs[0] == plain and outs[-1] == plain
    for name, got in zip(BAD_WORDS, outs[1:]):
        sequences, ref = bad_words_references[name]
        assert any(_contains(plain, seq) for seq in sequences), name   # greedy does say it
        assert not any(_contains(got, seq) for seq in sequences), (name, got)
        assert got == ref, name
    is_ = scheduled_llm.get_tokenizer().encode(" is", add_special_tokens=False)
    assert len(is_) == 1 and is_[0] in outs[2]   # " is" is banned only right after " answer"


def test_bad_words_with_a_structured_outputs_grammar(scheduled_llm):
    """bad_words beside a grammar (with async scheduling, the grammar process's deferred
    sampling): greedy picks "The answer is yes"; with "answer is" banned the grammar's other
    choice, and " is" never follows " answer" in the ids."""
    from pagedserve import StructuredOutputsParams
    choice = StructuredOutputsParams(choice=["The answer is yes", "The answer was no"])
    prompt = "Question: is Paris the capital of France? Reply:"
    plain, banned = scheduled_llm.generate([prompt] * 2, [
        SamplingParams(max_tokens=12, temperature=0.0, structured_outputs=choice),
        SamplingParams(max_tokens=12, temperature=0.0, structured_outputs=choice, bad_words=["answer is"])],
        use_tqdm=False)
    answer_is = scheduled_llm.get_tokenizer().encode(" answer is", add_special_tokens=False)
    assert plain.outputs[0].text == "The answer is yes" and _contains(plain.outputs[0].token_ids, answer_is)
    assert banned.outputs[0].text == "The answer was no"
    assert not _contains(banned.outputs[0].token_ids, answer_is)


def test_repetition_penalty_greedy_equals_transformers(scheduled_llm, hf_model):
    """repetition_penalty over the prompt and the output (vLLM's and transformers'), in lockstep and
    with async scheduling (the prompt's ids and each step's token read on the device): greedy ids
    equal transformers' generate with the same penalty, in one batch beside plain requests, which
    keep their own greedy ids; the penalty does change the ids."""
    prompts = PROMPTS[:4]
    tokenizer = scheduled_llm.get_tokenizer()
    refs = {}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(TEST_DEVICE)
        for penalty in (1.0, 1.5):
            with torch.no_grad():
                refs[prompt, penalty] = hf_model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=BAD_WORDS_TOKENS,
                    repetition_penalty=penalty)[0, ids.shape[1]:].tolist()
    batch = [(prompt, penalty) for prompt in prompts for penalty in (1.5, 1.0)]
    outs = scheduled_llm.generate([p for p, _ in batch], [
        SamplingParams(max_tokens=BAD_WORDS_TOKENS, temperature=0.0, repetition_penalty=penalty) for _, penalty in batch],
        use_tqdm=False)
    assert sum(refs[p, 1.5] != refs[p, 1.0] for p in prompts) >= 2
    for key, out in zip(batch, outs):
        assert out.outputs[0].token_ids == refs[key], key
