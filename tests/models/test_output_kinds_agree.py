"""The three output kinds give one answer: a request's text, token ids and finish / stop reasons
are the same whether its outputs are deltas (streaming), cumulative, or one final output (which
the core reports once, at the end: EngineCore's final-only path), over seeded random cases on
the default model: stop strings cut out of the greedy text (so they match, mid-token or across
tokens), include_stop_str_in_output, special tokens kept, n = 2, min_tokens, non-ASCII prompts."""
from __future__ import annotations

import random

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.frontend.output_processor import OutputKind

PROMPTS = ["The capital of France is", "Écris un poème sur la mer 🌊:", "日本の首都は", "List three emojis: ",
           "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "def fib(n):"]


@pytest.fixture(scope="module")
def llm():
    engine = LLM(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=96, seed=0)
    yield engine
    engine.shutdown()


def _run(llm: LLM, rid: str, prompt: str, params: SamplingParams, kind: OutputKind) -> dict:
    """{index: (text, token ids, finish reason, stop reason)} of one request, its outputs joined."""
    engine = llm.engine
    engine.add_request(rid, prompt, params, kind)
    text: dict[int, str] = {}
    ids: dict[int, list[int]] = {}
    ends: dict[int, tuple] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id == rid
            for c in output.outputs:
                if kind is OutputKind.DELTA:
                    text[c.index] = text.get(c.index, "") + c.text
                    ids[c.index] = ids.get(c.index, []) + list(c.token_ids)
                else:
                    text[c.index], ids[c.index] = c.text, list(c.token_ids)
                if c.finish_reason is not None:
                    ends[c.index] = (c.finish_reason, c.stop_reason)
    return {i: (text[i], ids[i], *ends[i]) for i in ends}


def _case(rng: random.Random, greedy_text: str) -> SamplingParams:
    max_tokens = rng.randint(1, 24)
    kwargs = dict(max_tokens=max_tokens, temperature=rng.choice([0.0, 0.0, 0.8]), seed=rng.randint(0, 99))
    if greedy_text and rng.random() < 0.75:
        start = rng.randrange(len(greedy_text))
        kwargs["stop"] = [greedy_text[start:start + rng.randint(1, 6)]]
    kwargs["include_stop_str_in_output"] = rng.random() < 0.4
    kwargs["skip_special_tokens"] = rng.random() < 0.7
    if rng.random() < 0.25:
        kwargs["n"] = 2
    if rng.random() < 0.25:
        kwargs["min_tokens"] = rng.randint(0, max_tokens)
    return SamplingParams(**kwargs)


@pytest.mark.parametrize("seed", range(12))
def test_delta_cumulative_and_final_only_agree(llm, seed):
    rng = random.Random(seed)
    prompt = rng.choice(PROMPTS)
    greedy = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0]
    params = _case(rng, greedy.outputs[0].text)
    answers = {kind: _run(llm, f"{kind.name}-{seed}", prompt, params.clone(), kind) for kind in OutputKind}
    final = answers[OutputKind.FINAL_ONLY]
    assert answers[OutputKind.DELTA] == final, params
    assert answers[OutputKind.CUMULATIVE] == final, params
    assert sorted(final) == list(range(params.n))
    for text, _, reason, stop in final.values():
        if reason == "stop" and isinstance(stop, str) and params.include_stop_str_in_output:
            assert text.endswith(stop)
