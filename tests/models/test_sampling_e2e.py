"""Sampling end to end through LLM.generate on the default model (SmolLM2-135M-Instruct,
fp32, CPU): seeded reproducibility whatever else is in the batch, top_k=1 / tiny top_p
equal greedy, min_tokens holds EOS back, logit_bias forces a token, and finish_reason /
stop_reason exactly as vLLM reports them. Every test runs twice: in lockstep, and with async
scheduling (one step in flight; EOS and stop strings are seen a step late, the extra row's
token is dropped), which must not change a single token or reason.

Greedy continuation of PROMPT, token by token (pinned below, so a change shows up here):
    " Paris" "." "\\n" "\\n" "The" " answer" " is" ":" ...
"""
from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams

PROMPT = "The capital of France is"
GREEDY_IDS = [7042, 30, 198, 198, 504, 2988, 314, 42]
GREEDY_TEXT = " Paris.\n\nThe answer is:"
NEWLINE = 198
EOS = 2
CHAT = [{"role": "user", "content": "Say hello."}]
CHAT_GREEDY_LEN = 30   # the greedy reply ends with EOS as its 30th token
OTHER_PROMPTS = ["Once upon a time", "1, 2, 3,", "Hello, my name is"]


@pytest.fixture(scope="module", params=[False, True], ids=["lockstep", "async"])
def llm(request):
    engine = LLM(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=128, seed=0,
                 async_scheduling=request.param)
    assert engine.engine.core.async_scheduling == request.param
    yield engine
    engine.shutdown()


def generate(llm: LLM, prompts, params) -> list:
    return llm.generate(prompts, params, use_tqdm=False)


def test_greedy_reference(llm):
    (out,) = generate(llm, PROMPT, SamplingParams(temperature=0.0, max_tokens=8))
    assert out.outputs[0].token_ids == GREEDY_IDS
    assert out.outputs[0].text == GREEDY_TEXT
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("length", None)


def test_seeded_request_is_the_same_alone_and_in_any_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    (alone,) = generate(llm, PROMPT, seeded)
    others = [SamplingParams(temperature=0.0, max_tokens=10),
              SamplingParams(temperature=1.2, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, presence_penalty=0.5, seed=5, max_tokens=5)]
    batch = generate(llm, [OTHER_PROMPTS[0], PROMPT, OTHER_PROMPTS[1], OTHER_PROMPTS[2], PROMPT],
                     [others[0], seeded, others[1], others[2], seeded])
    assert batch[1].outputs[0].token_ids == alone.outputs[0].token_ids
    assert batch[4].outputs[0].token_ids == alone.outputs[0].token_ids
    assert alone.outputs[0].token_ids[:8] != GREEDY_IDS   # it really sampled
    (again,) = generate(llm, PROMPT, seeded)
    assert again.outputs[0].token_ids == alone.outputs[0].token_ids
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, seed=4321, max_tokens=16, ignore_eos=True)
    assert generate(llm, PROMPT, other_seed)[0].outputs[0].token_ids != alone.outputs[0].token_ids


def test_unseeded_sampling_varies(llm):
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    outs = generate(llm, [PROMPT] * 4, params)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) > 1


def test_top_k_1_and_tiny_top_p_equal_greedy(llm):
    outs = generate(llm, [PROMPT, PROMPT, PROMPT], [
        SamplingParams(temperature=1.5, top_k=1, max_tokens=8),
        SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=8),
        SamplingParams(temperature=1.0, min_p=1.0, max_tokens=8)])
    assert [o.outputs[0].token_ids for o in outs] == [GREEDY_IDS] * 3


def test_min_tokens_holds_back_eos(llm):
    (free,) = llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=60), use_tqdm=False)
    assert len(free.outputs[0].token_ids) == CHAT_GREEDY_LEN and free.outputs[0].token_ids[-1] == EOS
    (held,) = llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=60, min_tokens=40), use_tqdm=False)
    tokens = held.outputs[0].token_ids
    assert len(tokens) >= 40 and EOS not in tokens[:40]
    assert tokens[:CHAT_GREEDY_LEN - 1] == free.outputs[0].token_ids[:-1]


def test_logit_bias_forces_a_token(llm):
    forced = 7042   # " Paris"
    outs = generate(llm, [OTHER_PROMPTS[0], OTHER_PROMPTS[1]], [
        SamplingParams(temperature=1.0, logit_bias={forced: 100.0}, max_tokens=5),
        SamplingParams(temperature=0.0, logit_bias={str(forced): 100}, max_tokens=5)])
    assert [o.outputs[0].token_ids for o in outs] == [[forced] * 5, [forced] * 5]
    (banned,) = generate(llm, PROMPT, SamplingParams(temperature=0.0, logit_bias={7042: -100.0}, max_tokens=1))
    assert banned.outputs[0].token_ids != [7042]


# ---- finish_reason / stop_reason ----------------------------------------------------------

def completion(llm: LLM, **kwargs):
    kwargs.setdefault("temperature", 0.0)
    kwargs.setdefault("max_tokens", 8)
    return generate(llm, PROMPT, SamplingParams(**kwargs))[0].outputs[0]


def test_eos_is_stop_with_no_stop_reason(llm):
    for skip in (True, False):
        (out,) = llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=60, skip_special_tokens=skip),
                          use_tqdm=False)
        c = out.outputs[0]
        assert (c.finish_reason, c.stop_reason) == ("stop", None)
        assert c.token_ids[-1] == EOS   # the EOS id is reported, its text is not
        assert "<|im_end|>" not in c.text and c.text.endswith("today?")


def test_ignore_eos_runs_to_length(llm):
    (out,) = llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=35, ignore_eos=True), use_tqdm=False)
    c = out.outputs[0]
    assert (c.finish_reason, c.stop_reason, len(c.token_ids)) == ("length", None, 35)
    assert c.token_ids[CHAT_GREEDY_LEN - 1] == EOS


def test_length(llm):
    c = completion(llm, max_tokens=3)
    assert (c.finish_reason, c.stop_reason, c.token_ids, c.text) == ("length", None, GREEDY_IDS[:3], " Paris.\n")


def test_stop_token_id_is_the_stop_reason(llm):
    c = completion(llm, stop_token_ids=[NEWLINE])
    assert (c.finish_reason, c.stop_reason, c.token_ids, c.text) == ("stop", NEWLINE, GREEDY_IDS[:3], " Paris.")
    c = completion(llm, stop_token_ids=[NEWLINE], include_stop_str_in_output=True)
    assert (c.finish_reason, c.stop_reason, c.text) == ("stop", NEWLINE, " Paris.\n")


def test_stop_token_id_waits_for_min_tokens(llm):
    c = completion(llm, stop_token_ids=[NEWLINE], min_tokens=2)   # the 3rd token may stop
    assert (c.finish_reason, c.stop_reason, c.token_ids) == ("stop", NEWLINE, GREEDY_IDS[:3])
    c = completion(llm, stop_token_ids=[NEWLINE], min_tokens=4, max_tokens=40)
    assert (c.finish_reason, c.stop_reason) == ("stop", NEWLINE)
    assert c.token_ids[:2] == GREEDY_IDS[:2] and c.token_ids[2] != NEWLINE   # held back at the 3rd
    assert len(c.token_ids) > 4 and c.token_ids[-1] == NEWLINE and NEWLINE not in c.token_ids[:-1]
    assert c.text == " Paris. The capital of France is not a country, but rather a city."


@pytest.mark.parametrize("stop,text,num_tokens", [
    ("\n", " Paris.", 3),
    ("ari", " P", 1),               # inside one token
    ("is:", " Paris.\n\nThe answer ", 8),   # spans " is" and ":"
    ("s.\n\nTh", " Pari", 5),       # spans four tokens
])
def test_stop_string_is_the_stop_reason(llm, stop, text, num_tokens):
    c = completion(llm, stop=[stop])
    assert (c.finish_reason, c.stop_reason, c.text, c.token_ids) == ("stop", stop, text, GREEDY_IDS[:num_tokens])
    c = completion(llm, stop=stop, include_stop_str_in_output=True)
    assert (c.finish_reason, c.stop_reason, c.text) == ("stop", stop, text + stop)


def test_first_stop_string_to_appear_wins(llm):
    c = completion(llm, stop=["answer", "\n\n"])
    assert (c.stop_reason, c.text) == ("\n\n", " Paris.")


def test_stop_string_in_the_prompt_does_not_stop(llm):
    c = completion(llm, stop=["capital"])
    assert (c.finish_reason, c.stop_reason, c.text) == ("length", None, GREEDY_TEXT)


def test_stop_string_on_the_last_allowed_token_is_stop(llm):
    c = completion(llm, stop=[":"], max_tokens=8)
    assert (c.finish_reason, c.stop_reason, c.text) == ("stop", ":", " Paris.\n\nThe answer is")


def test_parallel_sampling_outputs_in_index_order_and_differ(llm):
    (out,) = generate(llm, PROMPT, SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True))
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4
    for i, c in enumerate(out.outputs):
        single = SamplingParams(temperature=1.0, seed=11 + i, max_tokens=10, ignore_eos=True)
        assert generate(llm, PROMPT, single)[0].outputs[0].token_ids == c.token_ids
    kv = llm.engine.core.kv_cache_manager
    assert kv.pool.num_free_blocks == kv.num_blocks
