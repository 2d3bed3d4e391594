"""EngineCore on a scripted fake Executor (no model, CPU): what one step returns (outputs, stats,
request events), a failing step failing exactly its requests with the error text, and the
lockstep / async step picked once at construction."""
from __future__ import annotations

import dataclasses
import time

import pytest

from pagedserve.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig, WeightSource
from pagedserve.core.engine_core import EngineCore
from pagedserve.core.outputs import EngineCoreOutput, EngineStats, RequestEventType
from pagedserve.core.request import Request
from pagedserve.engine_io import ModelRunnerOutput, RequestId, SchedulerOutput, TokenLogprobs
from pagedserve.sampling_params import SamplingParams

NUM_BLOCKS = 32
TOKEN = 7


class FakePending:
    def __init__(self, output: ModelRunnerOutput) -> None:
        self.output = output

    def get(self) -> ModelRunnerOutput:
        return self.output


class FakeExecutor:
    """Every scheduled request samples TOKEN (prompts fit one step); call numbers in
    `fail_calls` raise instead."""

    def __init__(self, max_concurrent_batches: int = 1, fail_calls: tuple[int, ...] = (),
                 poisoned: str | None = None) -> None:
        self.num_blocks = NUM_BLOCKS
        self.max_concurrent_batches = max_concurrent_batches
        self.fail_calls = fail_calls
        self.poisoned = poisoned   # every step holding this request id raises
        self.calls: list[tuple[SchedulerOutput, bool]] = []
        self.health_checks = 0

    def execute_model(self, so: SchedulerOutput, non_block: bool = False) -> ModelRunnerOutput | FakePending:
        self.calls.append((so, non_block))
        if len(self.calls) in self.fail_calls:
            raise RuntimeError("device fault")
        if self.poisoned in so.num_scheduled_tokens:
            raise RuntimeError(f"bad value in {self.poisoned}")
        output = ModelRunnerOutput({rid: TOKEN for rid in so.num_scheduled_tokens},
                                   {rid: TokenLogprobs([TOKEN], [-0.5], 1) for rid in so.num_scheduled_tokens})
        return FakePending(output) if non_block else output

    def check_health(self) -> None:
        self.health_checks += 1

    def shutdown(self) -> None:
        pass


def make_core(executor: FakeExecutor, async_scheduling: bool = False) -> EngineCore:
    # the core reads only the cache, scheduler and device parts of the config
    config = EngineConfig(model=None, weights=WeightSource("unused"),  # type: ignore[arg-type]
                          cache=CacheConfig(block_size=4),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64),
                          device=DeviceConfig(async_scheduling=async_scheduling))
    return EngineCore(config, executor)


def request(rid: str, max_tokens: int = 2) -> Request:
    return Request(RequestId(rid), [1, 2, 3, 4, 5], SamplingParams(max_tokens=max_tokens, logprobs=0),
                   max_tokens=max_tokens)


def test_a_request_through_two_lockstep_steps():
    core = make_core(FakeExecutor())
    before = time.monotonic()
    core.add_request(request("a"))
    first = core.step()
    after_first = time.monotonic()
    assert first.outputs == [EngineCoreOutput(RequestId("a"), [TOKEN], None, None, TokenLogprobs([TOKEN], [-0.5], 1),
                                              None, 0)]
    # 5 prompt tokens in blocks of 4: 2 of 32 blocks held; nothing cached yet
    assert first.stats == EngineStats(num_running=1, num_waiting=0, kv_cache_usage=2 / NUM_BLOCKS,
                                      num_preemptions=0, prefix_cache_queries=5, prefix_cache_hits=0,
                                      num_batched_tokens=5, prompt_tokens=5, generation_tokens=1)
    assert [(e.req_id, e.type, e.finish_reason) for e in first.events] == [
        ("a", RequestEventType.QUEUED, None), ("a", RequestEventType.SCHEDULED, None),
        ("a", RequestEventType.FIRST_TOKEN, None)]
    times = [e.timestamp for e in first.events]
    assert before <= times[0] <= times[1] <= times[2] <= after_first

    second = core.step()
    assert second.outputs == [EngineCoreOutput(RequestId("a"), [TOKEN], "length", None,
                                               TokenLogprobs([TOKEN], [-0.5], 1), None, 0)]
    assert second.stats == EngineStats(0, 0, 0.0, 0, 5, 0, 1, prompt_tokens=5, generation_tokens=2)   # a decode step
    assert [(e.req_id, e.type, e.finish_reason) for e in second.events] == [
        ("a", RequestEventType.FINISHED, "length")]
    assert second.events[0].timestamp >= times[2]
    assert not core.has_unfinished_requests()
    # an idle step: nothing, no events
    idle = core.step()
    assert idle.outputs == [] and idle.events == [] and idle.stats == dataclasses.replace(second.stats,
                                                                                          num_batched_tokens=0)


def run_to_end(core: EngineCore, limit: int = 100) -> tuple[list[EngineCoreOutput], list]:
    outputs: list[EngineCoreOutput] = []
    events = []
    for _ in range(limit):
        if not core.has_unfinished_requests():
            break
        result = core.step()
        outputs += result.outputs
        events += result.events
    assert not core.has_unfinished_requests()
    return outputs, events


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["lockstep", "async"])
def test_a_failed_step_of_several_requests_retries_them_and_the_core_serves_on(async_scheduling):
    """A fault no single request explains: nothing fails; the step's requests are recomputed
    (each alone first) and finish with all their tokens."""
    executor = FakeExecutor(max_concurrent_batches=2, fail_calls=(2,))
    core = make_core(executor, async_scheduling)
    core.add_request(request("a", max_tokens=3))
    core.add_request(request("b", max_tokens=3))
    outputs, events = run_to_end(core)
    assert [o for o in outputs if o.error is not None] == []
    for rid in "ab":
        mine = [o for o in outputs if o.req_id == rid]
        assert sum(len(o.new_token_ids) for o in mine) == 3 and mine[-1].finish_reason == "length"
    assert sorted((e.req_id, e.finish_reason) for e in events if e.type is RequestEventType.FINISHED) == [
        ("a", "length"), ("b", "length")]
    assert executor.health_checks == 1
    assert core.stats().kv_cache_usage == 0.0 and not core.scheduler.suspects
    # the failed step's requests were sent again in full (the runner dropped their state)
    retried = [so for so, _ in executor.calls[2:] if so.preempted_req_ids]
    assert retried and retried[0].preempted_req_ids == {"a", "b"}

    core.add_request(request("c", max_tokens=3))
    later, _ = run_to_end(core)
    assert [(o.req_id, o.new_token_ids, o.finish_reason, o.error) for o in later] == [
        ("c", [TOKEN], None, None), ("c", [TOKEN], None, None), ("c", [TOKEN], "length", None)]
    assert core.stats().kv_cache_usage == 0.0


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["lockstep", "async"])
def test_a_request_that_makes_every_step_fail_fails_alone(async_scheduling):
    executor = FakeExecutor(max_concurrent_batches=2)
    core = make_core(executor, async_scheduling)
    for rid in ("a", "b"):
        core.add_request(request(rid, max_tokens=4))
    core.step()
    core.step()   # a and b are decoding when the bad one joins
    executor.poisoned = "bad"
    core.add_request(request("bad", max_tokens=4))
    core.add_request(request("d", max_tokens=4))
    outputs, events = run_to_end(core)
    failed = [(o.req_id, o.finish_reason, o.error) for o in outputs if o.error is not None]
    assert failed == [("bad", "abort", "RuntimeError: bad value in bad")]
    finished = {e.req_id: e.finish_reason for e in events if e.type is RequestEventType.FINISHED}
    assert finished == {"a": "length", "b": "length", "bad": "abort", "d": "length"}
    assert core.stats().kv_cache_usage == 0.0 and not core.scheduler.suspects


def test_a_lone_failing_request_fails_at_once():
    executor = FakeExecutor(poisoned="bad")
    core = make_core(executor)
    core.add_request(request("bad"))
    outputs, _ = run_to_end(core, limit=3)
    assert [(o.req_id, o.error) for o in outputs] == [("bad", "RuntimeError: bad value in bad")]
    assert len(executor.calls) == 1


@pytest.mark.parametrize("async_config, max_batches, expected", [
    (False, 2, "_step_lockstep"), (True, 1, "_step_lockstep"), (True, 2, "_step_async")])
def test_the_step_method_is_picked_once(async_config, max_batches, expected):
    executor = FakeExecutor(max_concurrent_batches=max_batches)
    core = make_core(executor, async_config)
    assert core._step_impl is getattr(EngineCore, expected)
    assert core.async_scheduling == (expected == "_step_async")
    core.add_request(request("a"))
    tokens = []
    while core.has_unfinished_requests():
        tokens.append([o.new_token_ids for o in core.step().outputs])
    if expected == "_step_async":
        # one step in flight: the first call only launches; each later call applies the previous one
        assert tokens == [[], [[TOKEN]], [[TOKEN]]]
        assert [non_block for _, non_block in executor.calls] == [True, True]
    else:
        assert tokens == [[[TOKEN]], [[TOKEN]]]
        assert [non_block for _, non_block in executor.calls] == [False, False]


# ---- through the frontend, on the tiny model -----------------------------------------------

def test_cache_salt_separates_prefix_cache_hits(tiny_checkpoints):
    from pagedserve import LLM
    llm = LLM(model=tiny_checkpoints["llama"], device="cpu", dtype="float32", max_model_len=128,
              skip_tokenizer_init=True, block_size=4, num_kv_blocks=200)
    prompt = list(range(10, 30))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    def cached(salt: str | None) -> int:
        request = {"prompt_token_ids": prompt} if salt is None else {"prompt_token_ids": prompt, "cache_salt": salt}
        (output,) = llm.generate(request, params, use_tqdm=False)
        assert output.metrics["arrival_time"] <= output.metrics["first_token_time"]
        return output.num_cached_tokens

    assert cached("alice") == 0
    assert cached("alice") == 16     # the last prompt token is always computed: 4 full blocks of 4
    assert cached("bob") == 0
    assert cached(None) == 0
    assert cached("bob") == 16
    llm.shutdown()


def test_a_dropped_core_is_freed_without_the_cycle_collector():
    """The picked step method must not make the core reference itself: a dropped engine's
    executor (and on GPU its KV cache) goes at once, not at the next gc pass."""
    import gc
    import weakref
    gc.disable()
    try:
        executor = FakeExecutor(max_concurrent_batches=2)
        ref = weakref.ref(executor)
        core = make_core(executor, True)
        core.add_request(request("a"))
        core.step()
        del core, executor
        assert ref() is None
    finally:
        gc.enable()


def quiet(rid: str, max_tokens: int) -> Request:
    """A request the frontend reads only at its end (LLMEngine sets this for final-only outputs
    with no stop strings and no logprobs)."""
    req = Request(RequestId(rid), [1, 2, 3, 4, 5], SamplingParams(max_tokens=max_tokens), max_tokens=max_tokens)
    req.report_final_only = True
    return req


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["lockstep", "async"])
def test_a_final_only_request_is_reported_once_with_all_its_tokens(async_scheduling):
    core = make_core(FakeExecutor(max_concurrent_batches=2), async_scheduling)
    core.add_request(quiet("q", max_tokens=4))
    core.add_request(request("d", max_tokens=3))
    outputs, events = run_to_end(core)
    assert [(o.req_id, o.new_token_ids, o.finish_reason) for o in outputs if o.req_id == "q"] == [
        ("q", [TOKEN] * 4, "length")]
    assert [(o.new_token_ids, o.finish_reason) for o in outputs if o.req_id == "d"] == [
        ([TOKEN], None), ([TOKEN], None), ([TOKEN], "length")]
    # its events are as any request's: a first token, then finished
    mine = [e.type for e in events if e.req_id == "q"]
    assert mine.count(RequestEventType.FIRST_TOKEN) == 1 and mine[-1] is RequestEventType.FINISHED


def test_a_failing_final_only_request_reports_the_tokens_it_had():
    executor = FakeExecutor()
    core = make_core(executor)
    core.add_request(quiet("q", max_tokens=6))
    assert core.step().outputs + core.step().outputs == []   # two tokens sampled, none reported yet
    assert core.scheduler.requests["q"].output_token_ids == [TOKEN, TOKEN]
    executor.poisoned = "q"
    outputs, _ = run_to_end(core, limit=5)
    assert [(o.req_id, o.new_token_ids, o.finish_reason, o.error) for o in outputs] == [
        ("q", [TOKEN, TOKEN], "abort", "RuntimeError: bad value in q")]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["lockstep", "async"])
def test_token_counters_move_as_the_core_runs(async_scheduling):
    """EngineStats.prompt_tokens counts a prompt when its first token arrives (once for a family
    of parallel samples: one prefill), generation_tokens each token in the step it is sampled,
    final-only or not (as vLLM V1's counters: /metrics' rate() follows the engine, not request
    ends); a request aborted before its first token adds nothing."""
    core = make_core(FakeExecutor(max_concurrent_batches=2), async_scheduling)
    params = SamplingParams(max_tokens=3, n=2)
    parent, fork = (Request(RequestId(f"p-{i}"), [1, 2, 3, 4, 5, 6], params, max_tokens=3, parent_id=RequestId("p"),
                            index=i) for i in range(2))
    core.add_request(parent, [fork])
    core.add_request(quiet("q", max_tokens=3))   # 5 prompt tokens, reported only at its end
    core.add_request(request("gone"))
    core.abort_requests([RequestId("gone")])
    seen = []
    while core.has_unfinished_requests():
        stats = core.step().stats
        seen.append((stats.prompt_tokens, stats.generation_tokens, core.has_unfinished_requests()))
        assert len(seen) < 10
    assert seen[-1][:2] == (6 + 5, 3 * 3)
    assert [s[:2] for s in seen] == sorted(s[:2] for s in seen)   # they only grow
    assert (6 + 5, 3, True) in seen   # the first tokens counted while all three still run
