"""Final-only outputs reported once (EngineCore reports a sequence the frontend reads only at its
end, LLM.generate's and non-streaming requests', in one output when it finishes): the default
model gives the same token ids, text and finish reasons as when every step is reported (a stop
string that never matches forces that), greedy and seeded sampling, n = 1 and n = 2; and which
requests are reported once."""
from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.frontend.output_processor import OutputKind

PROMPTS = ["The capital of France is", "Write a haiku about the sea:", "1, 2, 3, 4,"]
NEVER = "\x00never\x00"


@pytest.fixture(scope="module")
def llm():
    engine = LLM(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=96, seed=0)
    yield engine
    engine.shutdown()


def _summary(outputs):
    return [[(c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=24),
    SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=20, n=2),
    SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[13]),
], ids=["greedy", "seeded-n2", "stop-token"])
def test_reported_once_equals_reported_every_step(llm, params):
    every_step = params.clone()
    every_step.stop = [NEVER]
    once = llm.generate(PROMPTS, params, use_tqdm=False)
    stepwise = llm.generate(PROMPTS, every_step, use_tqdm=False)
    assert _summary(once) == _summary(stepwise)
    assert all(c.token_ids for o in once for c in o.outputs)


def test_which_requests_are_reported_once(llm):
    engine = llm.engine
    plain = SamplingParams(max_tokens=4)
    cases = {"final": (plain, OutputKind.FINAL_ONLY), "delta": (plain, OutputKind.DELTA),
             "stop-string": (SamplingParams(max_tokens=4, stop=[NEVER]), OutputKind.FINAL_ONLY),
             "logprobs": (SamplingParams(max_tokens=4, logprobs=1), OutputKind.FINAL_ONLY),
             "prompt-logprobs": (SamplingParams(max_tokens=4, prompt_logprobs=0), OutputKind.FINAL_ONLY)}
    processed = {name: engine.process_request(name, PROMPTS[0], params, kind)
                 for name, (params, kind) in cases.items()}
    assert {name: p.parent.report_final_only for name, p in processed.items()} == {
        "final": True, "delta": False, "stop-string": False, "logprobs": False, "prompt-logprobs": False}
    n2 = engine.process_request("n2", PROMPTS[0], SamplingParams(max_tokens=4, n=2, seed=1), OutputKind.FINAL_ONLY)
    assert n2.parent.report_final_only and all(f.report_final_only for f in n2.forks)
    best_of = engine.process_request("b", PROMPTS[0], SamplingParams(max_tokens=4, n=1, best_of=2, seed=1,
                                                                     temperature=1.0), OutputKind.FINAL_ONLY)
    assert not best_of.parent.report_final_only   # ranked by cumulative logprob: logprobs needed
