"""Decode windows (num_scheduler_steps, vLLM V0's multi-step scheduling): one schedule runs K
decode steps when every running request decodes and nothing waiting could join. The scheduler
gives each row slots for the window's K tokens and counts them in flight; the runner runs K
ordinary steps, each fed the last one's samples (a row that may take fewer tokens leaves after its
last); the core applies the K outputs in order, and a row that stops inside the window on a stop
token or string drops the tokens after its stop. The tokens are the same as one step a schedule:
greedy, seeded sampling, logprobs, stop strings, eager and through the decode graphs (emulated on
the CPU), lockstep and async (and under async TP: tests/unit/test_tensor_parallel.py)."""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.config import CacheConfig, DeviceConfig, EngineConfig, ParallelConfig, SchedulerConfig, WeightSource
from pagedserve.core.engine_core import EngineCore
from pagedserve.core.request import RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.engine_args import EngineArgs, default_num_scheduler_steps
from pagedserve.engine_io import ModelRunnerOutput
from pagedserve.errors import ValidationError
from pagedserve.worker.model_runner import ModelRunner
from tests.helpers import random_prompts
from tests.unit.test_decode_staging import emulate_graphs
from tests.unit.test_engine_core import FakeExecutor
from tests.unit.test_scheduler import make, req


def windowed(**kwargs) -> Scheduler:
    s = make(**kwargs)
    s.num_scheduler_steps = 4
    return s


def test_a_window_holds_its_tokens_and_drops_them_after_a_stop():
    s = windowed(budget=16)
    s.add_request(req("a", 6, max_tokens=6))
    s.add_request(req("b", 3, max_tokens=2, start=100))
    first = s.schedule()   # prompts: one step
    assert (first.num_steps, first.num_scheduled_tokens) == (1, {"a": 6, "b": 3})
    s.update_from_output(first, ModelRunnerOutput(sampled_token_ids={"a": 7, "b": 8}))
    window = s.schedule()
    # b may take one token more: it runs the window's first step only
    assert (window.num_steps, window.num_scheduled_tokens, window.window_row_steps) == (4, {"a": 1, "b": 1}, {"b": 1})
    # slots for 4 tokens: a's positions 6..9 need a 3rd block; b's one token, position 3, fits its 1st
    assert s.kv.block_ids("a") == [0, 1, 3] and s.kv.block_ids("b") == [2]
    assert [(c.req_id, c.new_block_ids, c.num_computed_tokens) for c in window.cached_requests] == [
        ("a", [3], 6), ("b", [], 3)]
    a, b = s.requests["a"], s.requests["b"]
    assert (a.num_unresolved_tokens, a.num_inflight_samples, b.num_unresolved_tokens, b.num_inflight_samples) == (
        4, 4, 1, 1)
    changed = s.update_from_output(window, ModelRunnerOutput(sampled_token_ids={"a": 11, "b": 12}))
    assert [r.request_id for r in changed] == ["a", "b"] and "b" not in s.requests   # b's 2nd token: length
    assert s.kv.pool.num_free_blocks == 61
    for token in (13, 15, 17):   # tokens of a row after its stop are dropped (here b's: the runner sends none)
        changed = s.update_from_output(window, ModelRunnerOutput(sampled_token_ids={"a": token, "b": token + 1}))
        assert [r.request_id for r in changed] == ["a"]
    assert a.output_token_ids == [7, 11, 13, 15, 17]
    assert (a.num_computed_tokens, a.num_unresolved_tokens, a.num_inflight_samples) == (10, 0, 0)
    last = s.schedule()   # one token left, for every row: no longer window than that
    assert last.num_steps == 1 and s.kv.block_ids("a") == [0, 1, 3]
    s.update_from_output(last, ModelRunnerOutput(sampled_token_ids={"a": 19}))
    assert a.output_token_ids == [7, 11, 13, 15, 17, 19] and a.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert s.kv.pool.num_free_blocks == 64


def test_a_window_is_no_longer_than_the_longest_row_left():
    s = windowed(budget=16)
    s.add_request(req("a", 6, max_tokens=4))
    s.add_request(req("b", 6, max_tokens=3, start=100))
    first = s.schedule()
    s.update_from_output(first, ModelRunnerOutput(sampled_token_ids={"a": 7, "b": 7}))
    window = s.schedule()   # a may take 3 more, b 2: a window of 3, b in its first two steps
    assert (window.num_steps, window.window_row_steps) == (3, {"b": 2})
    assert (s.requests["a"].num_inflight_samples, s.requests["b"].num_inflight_samples) == (3, 2)
    for token in (8, 9):
        s.update_from_output(window, ModelRunnerOutput(sampled_token_ids={"a": token, "b": token}))
    assert list(s.requests) == ["a"]
    s.update_from_output(window, ModelRunnerOutput(sampled_token_ids={"a": 10}))
    assert not s.requests and s.kv.pool.num_free_blocks == 64


def test_windows_in_flight_count_like_single_steps():
    """Async: the next window is scheduled while one is in flight; it takes the in-flight
    window's last sample as its query, and a row whose tokens in flight end it is passed over."""
    s = windowed(budget=16)
    s.add_request(req("a", 5, max_tokens=6))
    s.add_request(req("b", 5, max_tokens=20, start=50))
    first = s.schedule()
    s.update_from_output(first, ModelRunnerOutput(sampled_token_ids={"a": 1, "b": 1}))
    w1 = s.schedule()
    w2 = s.schedule()   # w1 in flight: a's 5 tokens (1 + 4) leave one to go, so a runs w2's first step
    assert (w1.num_steps, w2.num_steps) == (4, 4) and w2.num_scheduled_tokens == {"a": 1, "b": 1}
    assert (w1.window_row_steps, w2.window_row_steps) == ({}, {"a": 1})
    assert [c.num_computed_tokens for c in w2.cached_requests] == [9, 9]
    w3 = s.schedule()   # a's 9 tokens in flight reach max_tokens: only b
    assert (w3.num_steps, w3.num_scheduled_tokens) == (4, {"b": 1})
    b = s.requests["b"]
    assert (b.num_unresolved_tokens, b.num_inflight_samples, s.requests["a"].num_inflight_samples) == (12, 12, 5)
    for window in (w1, w2):
        for step in range(4):
            s.update_from_output(window, ModelRunnerOutput(sampled_token_ids={"a": 10 + step, "b": 20 + step}))
    assert "a" not in s.requests and len(b.output_token_ids) == 9 and b.num_computed_tokens == 13


@pytest.mark.parametrize("case", ["waiting", "max_model_len", "pool", "prefill", "constrained", "suspect"])
def test_one_step_when_a_window_could_not_run_whole(case):
    # pool: a's prompt takes 2 of 3 blocks; a window wants 2 spare a row (a new block, maybe a copy)
    s = windowed(budget=16, num_blocks=3 if case == "pool" else 64, max_len=12 if case == "max_model_len" else 64)
    s.add_request(req("a", 6, max_tokens=30))
    first = s.schedule()
    s.update_from_output(first, ModelRunnerOutput(sampled_token_ids={"a": 7}))
    assert s.schedule().num_steps == (1 if case in ("pool",) else 4)   # a: 7 tokens, 1 + 4 in flight
    if case == "waiting":
        s.add_request(req("b", 30, start=100))    # it could join: it is not kept waiting a window
    elif case == "max_model_len":
        pass   # a's query would be at position 10, its window's last at 13 >= 12
    elif case == "prefill":
        s.add_request(req("b", 30, start=100))
        s.schedule()                               # b joins with 15 of its 30 tokens: 15 more to go
    elif case == "constrained":
        s.num_constrained = 1
    elif case == "suspect":
        s.suspects.add("a")
    assert s.schedule().num_steps == 1


def test_a_full_batch_runs_windows_while_requests_wait():
    s = windowed(budget=16, max_seqs=1)
    s.add_request(req("a", 6, max_tokens=30))
    s.add_request(req("b", 6, max_tokens=30, start=100))
    first = s.schedule()
    s.update_from_output(first, ModelRunnerOutput(sampled_token_ids={"a": 7}))
    assert s.schedule().num_steps == 4 and [r.request_id for r in s.waiting] == ["b"]


PROMPTS = [{"prompt_token_ids": p} for p in random_prompts(7, 512, 3, 30, seed=13)]


def _params():
    params = [SamplingParams(temperature=0.0, max_tokens=3 + 5 * i, ignore_eos=True) for i in range(7)]
    params[2] = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=21, ignore_eos=True)
    params[4] = SamplingParams(temperature=0.0, logprobs=2, max_tokens=17, ignore_eos=True)
    params[6] = SamplingParams(temperature=0.7, seed=3, max_tokens=26, ignore_eos=True, logprobs=1,
                               repetition_penalty=1.3)
    return params


def count_windows(patch: pytest.MonkeyPatch, windows: collections.Counter) -> None:
    """Through `patch`: each schedule that runs something counts its steps in windows[K]."""
    schedule = Scheduler.schedule

    def counted(self):
        out = schedule(self)
        if out.num_scheduled_tokens:
            windows[out.num_steps] += 1
        return out
    patch.setattr(Scheduler, "schedule", counted)


def _generate(path, steps, async_scheduling, monkeypatch=None):
    """The outputs, and (with monkeypatch) a Counter of the windows' lengths, whose key "rows"
    counts the rows the runner computed over all steps (the counting undone on return; patches
    the caller made stay)."""
    windows = collections.Counter()
    with monkeypatch.context() if monkeypatch is not None else contextlib.nullcontext() as patch:
        if patch is not None:
            run_step = ModelRunner._run_step

            def counted_rows(self, so, scheduled, non_block):
                windows["rows"] += len(scheduled)
                return run_step(self, so, scheduled, non_block)
            count_windows(patch, windows)
            patch.setattr(ModelRunner, "_run_step", counted_rows)
        llm = LLM(model=path, device="cpu", dtype="float32", max_model_len=128, skip_tokenizer_init=True,
                  async_scheduling=async_scheduling, block_size=4, num_kv_blocks=200, max_num_seqs=8,
                  num_scheduler_steps=steps)
        try:
            outs = llm.generate(PROMPTS, _params(), use_tqdm=False)
        finally:
            llm.shutdown()
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs or [], o.outputs[0].finish_reason) for o in outs], windows


def assert_same(window, single) -> None:
    """Token ids, finish reasons and the logprobs' tokens and ranks exactly; logprob values to
    1e-4 (a window's steps keep rows that stopped inside it on a stop token or string, so fp32
    matmuls may see other batch sizes)."""
    assert [(ids, reason) for ids, _, reason in window] == [(ids, reason) for ids, _, reason in single]
    for (_, lps_w, _), (_, lps_s, _) in zip(window, single):
        assert [{t: lp.rank for t, lp in d.items()} for d in lps_w] == [{t: lp.rank for t, lp in d.items()} for d in lps_s]
        assert [lp.logprob for d in lps_w for lp in d.values()] == pytest.approx(
            [lp.logprob for d in lps_s for lp in d.values()], abs=1e-4)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_windows_give_the_single_step_tokens(tiny_checkpoints, monkeypatch, async_scheduling):
    tiny_llama = tiny_checkpoints["llama"]
    single, one_step = _generate(tiny_llama, 1, async_scheduling, monkeypatch)
    window, windows = _generate(tiny_llama, 4, async_scheduling, monkeypatch)
    assert windows[4] >= 5 and windows[1] >= 1   # windows ran (and the prompts' step did not)
    assert [len(ids) for ids, _, _ in window] == [3, 8, 21, 18, 17, 28, 26]
    assert sum(len(lps) for _, lps, _ in window) == 17 + 26
    assert_same(window, single)
    # every request ends by length: a row leaves its window with its last token, computing no row more
    assert windows["rows"] == one_step["rows"]


def test_windows_through_the_decode_graphs(tiny_checkpoints, monkeypatch):
    """The staged decode graphs: each step of a window is a replay fed the last one's ids on
    the device, and all-greedy steps take the graph's own argmax."""
    tiny_llama = tiny_checkpoints["llama"]
    single, _ = _generate(tiny_llama, 1, True)
    replays = emulate_graphs(monkeypatch)
    window, windows = _generate(tiny_llama, 4, True, monkeypatch)
    assert windows[4] >= 5 and len(replays) > 20
    assert_same(window, single)


def test_parallel_samples_share_blocks_through_windows(tiny_checkpoints):
    """n > 1: the siblings share the prompt's blocks (the partial last one copied on write
    inside a window's slots) and sample as without windows."""
    path = tiny_checkpoints["llama"]
    results = []
    for steps in (1, 4):
        llm = LLM(model=path, device="cpu", dtype="float32", max_model_len=128, skip_tokenizer_init=True,
                  block_size=4, num_kv_blocks=200, num_scheduler_steps=steps)
        try:
            outs = llm.generate(PROMPTS[:2], SamplingParams(n=3, temperature=0.9, seed=11, max_tokens=19,
                                                            ignore_eos=True), use_tqdm=False)
            results.append([[c.token_ids for c in o.outputs] for o in outs])
        finally:
            llm.shutdown()
    assert results[0] == results[1] and all(len(ids) == 19 for o in results[1] for ids in o)
    assert len({tuple(ids) for ids in results[1][0]}) == 3   # three different samples


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_windows_between_preemptions_give_the_single_step_tokens(tiny_checkpoints, monkeypatch, preemption_mode):
    """A pool too small for the batch: requests are preempted (recomputed, or swapped to the
    host tier and back) between windows, prompts are prefilled in chunks beside decoding rows,
    with a shared prefix, n = 2 and seeded draws; every
    request ends by length, so each step's batch is one step a schedule's and the ids are equal."""
    prefix = random_prompts(1, 512, 16, 16, seed=5)[0]
    prompts = [{"prompt_token_ids": prefix + p} for p in random_prompts(12, 512, 1, 30, seed=6)]
    params = [SamplingParams(max_tokens=8 + 3 * i, ignore_eos=True, n=2 if i % 5 == 1 else 1,
                             **(dict(temperature=0.8, top_p=0.9, seed=i) if i % 3 == 0 else dict(temperature=0.0)))
              for i in range(12)]
    results, counts = [], []
    for steps in (1, 4):
        with monkeypatch.context() as patch:
            windows = collections.Counter()
            count_windows(patch, windows)
            llm = LLM(model=tiny_checkpoints["llama"], device="cpu", dtype="float32", max_model_len=128,
                      skip_tokenizer_init=True, async_scheduling=True, block_size=4, num_kv_blocks=60,
                      max_num_seqs=8, max_num_batched_tokens=32, num_scheduler_steps=steps,
                      preemption_mode=preemption_mode)
            try:
                outs = llm.generate(prompts, params, use_tqdm=False)
                stats = llm.engine.core.scheduler.stats
                counts.append((windows[4], stats.num_preemptions, stats.num_swap_preemptions))
            finally:
                llm.shutdown()
        results.append([[c.token_ids for c in o.outputs] for o in outs])
    assert results[1] == results[0] and [len(o[0]) for o in results[1]] == [8 + 3 * i for i in range(12)]
    (_, single_preemptions, _), (windows_run, preemptions, swaps) = counts
    assert windows_run >= 5 and single_preemptions > 0 and preemptions > 0
    assert (swaps > 0) == (preemption_mode == "swap")


def test_stop_strings_and_eos_inside_a_window():
    """A stop string or a stop token met inside a window ends the request at the same token as
    one step a schedule would (the default model, its tokenizer: the detokenizer finds the string)."""
    results = []
    for steps in (1, 4):
        llm = LLM(device="cpu", max_model_len=256, block_size=4, num_kv_blocks=200, num_scheduler_steps=steps)
        try:
            tokenizer = llm.get_tokenizer()
            free = llm.generate(["hello world"], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0]
            stop_text = tokenizer.decode(free.token_ids[9:11])
            eos = free.token_ids[13]
            outs = llm.generate(["hello world"] * 2,
                                [SamplingParams(temperature=0.0, max_tokens=24, stop=[stop_text]),
                                 SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[eos])],
                                use_tqdm=False)
            results.append([(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason,
                             o.outputs[0].stop_reason) for o in outs])
        finally:
            llm.shutdown()
    assert results[0] == results[1]
    (ids_s, _, reason_s, _), (ids_e, _, reason_e, stop_e) = results[1]
    # the prompt's step samples token 1, windows 2-5, 6-9, 10-13, 14-17: both stops inside one
    assert reason_s == reason_e == "stop" and len(ids_s) == 11 and ids_e[-1] == stop_e and len(ids_e) == 14


@pytest.mark.parametrize("tp, pp, async_scheduling, expected", [
    (1, 1, False, 8), (2, 1, True, 8), (2, 1, False, 1), (1, 2, True, 1), (2, 2, True, 1)])
def test_windows_where_every_rank_takes_the_ids_from_rank_0(tp, pp, async_scheduling, expected, caplog):
    """One process, or async TP (each step's ids reach the workers by rank 0's device broadcast);
    lockstep TP keeps one step a schedule (a worker learns a step's tokens from the next
    schedule), and so does PP (its last stage samples), with a warning naming the knob."""
    config = EngineConfig(model=None, weights=WeightSource("unused"),  # type: ignore[arg-type]
                          cache=CacheConfig(block_size=4),
                          parallel=ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                                                    num_scheduler_steps=8),
                          device=DeviceConfig(async_scheduling=async_scheduling))
    with caplog.at_level("WARNING", logger="pagedserve.core.engine_core"):
        assert EngineCore(config, FakeExecutor()).scheduler.num_scheduler_steps == expected
    assert ("num_scheduler_steps=8 runs one step a schedule" in caplog.text) == (expected == 1)


def test_the_default_window(tiny_checkpoints):
    """4 for the offline LLM on one CUDA GPU; 1 for the server, on the CPU and over several
    ranks; an explicit value wins."""
    assert default_num_scheduler_steps(torch.device("cuda"), offline=True) == 4
    assert default_num_scheduler_steps(torch.device("cuda"), offline=False) == 1
    assert default_num_scheduler_steps(torch.device("cpu"), offline=True) == 1
    assert default_num_scheduler_steps(torch.device("cuda"), offline=True, world_size=2) == 1
    path = tiny_checkpoints["llama"]
    for steps, offline, expected in ((None, True, 1), (None, False, 1), (3, False, 3)):
        config = EngineArgs(model=path, device="cpu", num_scheduler_steps=steps).create_config(offline)[0]
        assert config.scheduler.num_scheduler_steps == expected


@pytest.mark.parametrize("value", [0, 65, True, 2.0, "4"])
def test_num_scheduler_steps_is_checked(value):
    with pytest.raises(ValidationError, match="num_scheduler_steps") as err:
        EngineArgs(num_scheduler_steps=value).validate()
    assert err.value.param == "num_scheduler_steps"
