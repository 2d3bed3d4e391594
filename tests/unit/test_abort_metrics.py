"""The finish stats of an aborted final-only request count the tokens the core made for it
(frontend/request_metrics.py): the core reports such a request only at its end, so its frontend
has seen none of them when it aborts. The core answers the abort with FINISHED events that carry
the counts (in the engine's own process at once, from a core process as a later step's events),
and the request is reported when the last arrives (exact counts, against the core's own)."""
from __future__ import annotations

import time

import pytest

from pagedserve import SamplingParams
from pagedserve.core.outputs import RequestEvent, RequestEventType
from pagedserve.engine_args import EngineArgs
from pagedserve.frontend.llm_engine import LLMEngine
from pagedserve.frontend.request_metrics import RequestMetrics
from pagedserve.outputs import CompletionOutput, RequestOutput

FINISHED = RequestEventType.FINISHED


def _aborted(request_id: str, *token_ids: list[int]) -> RequestOutput:
    """The frontend's last output of an aborted request (output_processor.abort_request)."""
    return RequestOutput(request_id, None, [1, 2], [CompletionOutput(i, "", list(ids), None, None, "abort")
                                                    for i, ids in enumerate(token_ids)], True)


def _metrics() -> tuple[RequestMetrics, list]:
    metrics, stats = RequestMetrics(), []
    metrics.listeners.append(stats.append)
    return metrics, stats


def test_counts_answered_with_the_abort_or_later_as_events() -> None:
    metrics, stats = _metrics()
    metrics.add("here", ["here"], 2, delta=False, arrival_time=0.0, final_only=True)
    metrics.observe(_aborted("here", []), await_counts=True)
    metrics.record([RequestEvent("here", FINISHED, time.monotonic(), "abort", 4)])   # the core in this process
    assert [(s.finish_reason, s.num_generation_tokens) for s in stats] == [("abort", 4)]

    metrics.add("there", ["there"], 2, delta=False, arrival_time=0.0, final_only=True)
    before = time.monotonic()
    metrics.observe(_aborted("there", []), await_counts=True)
    aborted_at = time.monotonic()
    assert len(stats) == 1   # waits for the core process's answer
    metrics.record([RequestEvent("there", FINISHED, aborted_at + 5.0, "abort", 7)])
    assert stats[1].num_generation_tokens == 7 and stats[1].finish_reason == "abort"
    assert before <= stats[1].finish_time <= aborted_at   # finished when aborted, not when counted
    metrics.record([RequestEvent("there", FINISHED, 6.0, "abort", 9)])   # nothing is reported twice
    assert len(stats) == 2


def test_awaited_counts_of_several_sequences_and_of_one_that_had_finished() -> None:
    """n = 2: sequence 0 finished before the abort (its tokens are in the output), sequence 1's
    count comes from the answer; an answer without a count (the core no longer ran it) adds none."""
    metrics, stats = _metrics()
    metrics.add("r", ["r-0", "r-1"], 2, delta=False, arrival_time=0.0, final_only=True)
    metrics.record([RequestEvent("r-0", FINISHED, 1.0, "length", 3)])
    metrics.observe(_aborted("r", [5, 6, 7], []), await_counts=True)
    assert stats == []
    metrics.record([RequestEvent("r-1", FINISHED, 2.0, "abort", 11)])
    assert [s.num_generation_tokens for s in stats] == [3 + 11]
    metrics.add("s", ["s-0", "s-1"], 2, delta=False, arrival_time=0.0, final_only=True)
    metrics.observe(_aborted("s", [], []), await_counts=True)
    metrics.record([RequestEvent("s-0", FINISHED, 2.0, "length", 4), RequestEvent("s-1", FINISHED, 2.0, "abort"),
                    RequestEvent("s-0", FINISHED, 2.0, "abort")])
    assert [s.num_generation_tokens for s in stats] == [14, 4]


def test_requests_whose_outputs_carry_their_tokens_are_reported_at_once() -> None:
    metrics, stats = _metrics()
    metrics.add("d", ["d"], 2, delta=True, arrival_time=0.0)
    metrics.observe(RequestOutput("d", None, [1], [CompletionOutput(0, "", [4, 5], None, None)], False))
    metrics.observe(_aborted("d", [6]), await_counts=True)   # streamed: its tokens were all seen
    assert [(s.finish_reason, s.num_generation_tokens) for s in stats] == [("abort", 3)]


@pytest.mark.parametrize("engine_process", [False, True])
def test_an_aborted_final_only_request_counts_the_cores_tokens(tiny_checkpoints, engine_process) -> None:
    engine = LLMEngine(EngineArgs(model=tiny_checkpoints["llama"], device="cpu", dtype="float32", max_model_len=64,
                                  num_kv_blocks=32, skip_tokenizer_init=True), engine_process=engine_process)
    stats = []
    engine.add_finish_listener(stats.append)
    try:
        engine.add_request("r", {"prompt_token_ids": [3, 4, 5, 6]},
                           SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
        while engine.stats().generation_tokens < 5:
            assert engine.step() == []   # final-only: nothing before the end
        engine.abort_request("r")
        if engine_process:
            assert stats == []   # the core's answer is read by the next step
            while engine.has_unfinished_requests():
                engine.step()
        else:
            assert not engine.has_unfinished_requests()
        generated = engine.stats().generation_tokens   # every token the core made (for this one request)
        assert 5 <= generated < 40
        assert [(s.finish_reason, s.num_generation_tokens) for s in stats] == [("abort", generated)]
    finally:
        engine.shutdown()
