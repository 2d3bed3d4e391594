"""The dashboard's engine snapshot (core/snapshot.py) on EngineCore with the scripted fake
executor of test_engine_core: exact block ids, ref counts, hash flags, block tables, queues
and the logged steps; nothing is logged or built unless a snapshot was requested."""
from __future__ import annotations

import pytest

from pagedserve.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig, WeightSource
from pagedserve.core.engine_core import EngineCore
from pagedserve.core.request import Request
from pagedserve.engine_io import ModelRunnerOutput, RequestId, SchedulerOutput
from pagedserve.sampling_params import SamplingParams
from tests.unit.test_engine_core import NUM_BLOCKS, TOKEN, FakeExecutor, FakePending, make_core


def req(rid: str, prompt: list[int], max_tokens: int = 2, n: int = 1) -> Request:
    return Request(RequestId(rid), prompt, SamplingParams(max_tokens=max_tokens, n=n), max_tokens=max_tokens)


def test_no_snapshot_and_no_step_log_unless_requested():
    core = make_core(FakeExecutor())
    core.add_request(req("a", [1, 2, 3, 4, 5]))
    out = core.step()
    assert out.stats.snapshot is None and core._step_log is None
    core.request_snapshot()
    assert core.stats().snapshot is not None   # the idle read carries it too
    assert core.stats().snapshot is None       # once per request
    core.stop_snapshots()
    core.step()
    assert core._step_log is None


def test_snapshot_blocks_tables_and_steps_with_a_shared_prefix():
    core = make_core(FakeExecutor())   # block_size 4, 32 blocks
    core.request_snapshot()
    core.add_request(req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    snap = core.step().stats.snapshot
    assert snap.num_blocks == NUM_BLOCKS and snap.block_size == 4 and snap.max_model_len == 64
    assert list(snap.ref_counts[:4]) == [1, 1, 1, 0] and set(snap.ref_counts[4:]) == {0}
    assert list(snap.cached[:4]) == [1, 1, 0, 0]   # the two full prompt blocks are hashed
    assert snap.used_block_ids == [0, 1, 2] and snap.cached_free_block_ids == []
    (a,) = snap.running
    assert (a.req_id, a.block_ids, a.num_prompt_tokens, a.num_output_tokens, a.num_computed_tokens) == \
        ("a", (0, 1, 2), 9, 1, 9)
    assert snap.waiting == ()
    (step,) = snap.steps
    assert (step.step, step.scheduled, step.prefill, step.arrived, step.finished, step.num_generated) == \
        (1, {"a": 9}, ("a",), ("a",), (), 1)
    assert snap.num_dropped_steps == 0 and snap.step == 1

    # b shares a's first two blocks (8 tokens) through the prefix cache
    core.add_request(req("b", [1, 2, 3, 4, 5, 6, 7, 8, 20, 21], max_tokens=3))
    core.request_snapshot()
    snap = core.step().stats.snapshot
    assert [s.scheduled for s in snap.steps] == [{"a": 1, "b": 2}]
    assert snap.steps[0].prefill == ("b",) and snap.steps[0].finished == (("a", "length"),)
    assert snap.steps[0].arrived == ("b",)
    (b,) = snap.running   # a finished in this step: its own blocks are free again
    assert (b.req_id, b.block_ids, b.num_cached_tokens) == ("b", (0, 1, 3), 8)
    assert list(snap.ref_counts[:5]) == [1, 1, 0, 1, 0]
    assert snap.owners(0) == ["b"] and snap.owners(2) == []
    # a's third block holds tokens 8..10 (never full): plain free; 4 is untouched
    assert list(snap.cached[:5]) == [1, 1, 0, 0, 0]


def test_snapshot_ref_counts_while_two_requests_share_a_prefix():
    core = make_core(FakeExecutor())
    core.add_request(req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], max_tokens=4))
    core.step()
    core.add_request(req("b", [1, 2, 3, 4, 5, 6, 7, 8, 30], max_tokens=4))
    core.request_snapshot()
    snap = core.step().stats.snapshot
    assert [(r.req_id, r.block_ids) for r in snap.running] == [("a", (0, 1, 2)), ("b", (0, 1, 3))]
    assert list(snap.ref_counts[:5]) == [2, 2, 1, 1, 0]
    assert snap.owners(1) == ["a", "b"]
    # the log started at the request: only the step after it is there
    assert [(s.step, s.scheduled, s.prefill) for s in snap.steps] == [(1, {"a": 1, "b": 1}, ("b",))]


def test_parallel_samples_share_the_prompt_blocks():
    core = make_core(FakeExecutor())
    parent = req("p", [1, 2, 3, 4, 5, 6], max_tokens=3, n=2)
    child = Request(RequestId("p-1"), [1, 2, 3, 4, 5, 6], parent.sampling_params, max_tokens=3,
                    parent_id=RequestId("p"), index=1)
    core.request_snapshot()
    core.add_request(parent, [child])
    snap = core.step().stats.snapshot
    assert [(r.req_id, r.parent_id, r.block_ids) for r in snap.running] == [("p", None, (0, 1)), ("p-1", "p", (0, 1))]
    assert list(snap.ref_counts[:3]) == [2, 2, 0]
    assert snap.steps[0].prefill == ("p", "p-1") and snap.steps[0].num_generated == 2
    core.request_snapshot()
    snap = core.step().stats.snapshot   # each writes its partial block: copy-on-write
    assert [(r.req_id, r.block_ids) for r in snap.running] == [("p", (0, 2)), ("p-1", (0, 1))]
    assert list(snap.ref_counts[:3]) == [2, 1, 1]
    assert snap.steps[0].prefill == ()


def test_preemption_is_logged_and_the_victim_waits_without_blocks():
    executor = FakeExecutor()
    executor.num_blocks = 16   # 64 token slots: two 30-token prompts fill them
    core = make_core(executor)
    core.request_snapshot()
    core.add_request(req("a", list(range(1, 31)), max_tokens=8))
    core.add_request(req("b", list(range(101, 131)), max_tokens=8))
    steps = []
    for _ in range(4):
        core.request_snapshot()
        snap = core.step().stats.snapshot
        steps += snap.steps
    assert [(s.step, s.scheduled, s.prefill, s.preempted) for s in steps] == [
        (1, {"a": 30, "b": 30}, ("a", "b"), ()),
        (2, {"a": 1, "b": 1}, (), ()),
        (3, {"a": 1, "b": 1}, (), ()),
        (4, {"a": 1}, (), ("b",)),
    ]
    assert [s.repeat for s in steps] == [False, True, True, False]
    assert snap.num_preemptions == 1
    (a,) = snap.running
    assert a.block_ids == (0, 1, 2, 3, 4, 5, 6, 7, 15)   # b's last block, freed by the preemption
    assert [(r.req_id, r.block_ids, r.num_preemptions, r.num_computed_tokens) for r in snap.waiting] == \
        [("b", (), 1, 0)]
    assert list(snap.ref_counts) == [1] * 8 + [0] * 7 + [1]
    # b's full blocks stay in the prefix cache, free; its last one was evicted for a's (partial) block
    assert list(snap.cached) == [1] * 15 + [0]
    assert snap.cached_free_block_ids == list(range(8, 15))


class ChunkingExecutor(FakeExecutor):
    """Samples a token only for rows that reach the end of their known tokens (as the model
    runner does: a partial prefill chunk samples nothing)."""

    def execute_model(self, so: SchedulerOutput, non_block: bool = False):
        ends = {n.req_id: len(n.token_ids) for n in so.new_requests}
        ends.update((c.req_id, c.num_tokens) for c in so.cached_requests)
        starts = {n.req_id: n.num_computed_tokens for n in so.new_requests}
        starts.update((c.req_id, c.num_computed_tokens) for c in so.cached_requests)
        self.calls.append((so, non_block))
        output = ModelRunnerOutput({rid: TOKEN for rid, n in so.num_scheduled_tokens.items()
                                    if starts[rid] + n >= ends[rid]})
        return FakePending(output) if non_block else output


def _core(max_num_batched_tokens: int, async_scheduling: bool) -> EngineCore:
    config = EngineConfig(model=None, weights=WeightSource("unused"),  # type: ignore[arg-type]
                          cache=CacheConfig(block_size=4),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=max_num_batched_tokens,
                                                    max_model_len=128),
                          device=DeviceConfig(async_scheduling=async_scheduling))
    return EngineCore(config, ChunkingExecutor(max_concurrent_batches=2 if async_scheduling else 1))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_one_token_last_prompt_chunk_is_prefill_and_decodes_are_not(async_scheduling):
    core = _core(max_num_batched_tokens=8, async_scheduling=async_scheduling)
    core.request_snapshot()
    core.add_request(req("a", list(range(1, 18)), max_tokens=3))   # 17 tokens: chunks of 8, 8, 1
    steps = []
    while core.has_unfinished_requests():
        core.request_snapshot()
        steps += core.step().stats.snapshot.steps
    # async: the third token is applied one call later, in a step that schedules nothing
    tail = [({}, ())] if async_scheduling else []
    assert [(s.scheduled, s.prefill) for s in steps] == [
        ({"a": 8}, ("a",)), ({"a": 8}, ("a",)), ({"a": 1}, ("a",)), ({"a": 1}, ()), ({"a": 1}, ())] + tail
    assert [s.finished for s in steps][-1] == (("a", "length"),)
    assert [s.num_generated for s in steps] == ([0, 0, 0, 1, 1, 1] if async_scheduling else [0, 0, 1, 1, 1])
    # decodes of the same requests as the step before are marked, not classified again
    assert [s.repeat for s in steps] == [False, False, False, True, True] + [False] * len(tail)
