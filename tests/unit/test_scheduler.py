"""Scheduler: token budget, chunked prefill mixed with decodes, FCFS admission, preemption
(newest first) and resume by recompute, max_num_seqs, the static policy and the priority
policy (admission, budget and preemption in (priority, arrival) order)."""
from __future__ import annotations

from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestId, RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.engine_io import ModelRunnerOutput, SchedulerOutput
from pagedserve.sampling_params import SamplingParams

B = 4


def make(num_blocks=64, budget=16, max_seqs=8, max_len=64, policy="continuous") -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, B), max_seqs, budget, max_len, policy)


def req(rid: str, prompt_len: int, max_tokens: int = 4, start: int = 0, priority: int = 0) -> Request:
    return Request(RequestId(rid), list(range(start, start + prompt_len)), SamplingParams(max_tokens=max_tokens),
                   max_tokens=max_tokens, priority=priority)


def run_step(s: Scheduler) -> tuple[SchedulerOutput, list[Request]]:
    """Pretend to run the model: every request reaching its last known token samples 7."""
    out = s.schedule()
    sampled = {}
    for rid, n in out.num_scheduled_tokens.items():
        r = s.requests[rid]
        if r.num_computed_tokens + n == r.num_tokens:
            sampled[rid] = 7
    return out, s.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))


def test_budget_and_chunked_prefill_mixed_with_decodes():
    s = make(budget=16)
    s.add_request(req("a", 6))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 6}
    s.add_request(req("b", 30, start=100))
    out, _ = run_step(s)
    # a decodes (1 token), b gets the remaining 15 of the budget
    assert out.num_scheduled_tokens == {"a": 1, "b": 15}
    assert out.total_num_scheduled_tokens == 16
    assert [n.req_id for n in out.new_requests] == ["b"] and [c.req_id for c in out.cached_requests] == ["a"]
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 15}
    assert s.requests["b"].num_computed_tokens == 30 and s.requests["b"].output_token_ids == [7]
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}


def test_max_num_seqs_and_fcfs():
    s = make(budget=100, max_seqs=2)
    for i in range(3):
        s.add_request(req(f"r{i}", 4, start=10 * i))
    out, _ = run_step(s)
    assert list(out.num_scheduled_tokens) == ["r0", "r1"]
    assert [r.request_id for r in s.waiting] == ["r2"]


def test_finished_request_leaves_and_frees():
    s = make(budget=100)
    s.add_request(req("a", 5, max_tokens=2))
    run_step(s)
    _, changed = run_step(s)
    assert changed[0].status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert not s.running and s.kv.pool.num_free_blocks == 64
    out = s.schedule()
    assert out.finished_req_ids == {"a"}


def test_preemption_newest_first_and_resume():
    # 5 blocks of 4 tokens; two requests of 8 prompt tokens need 2 blocks each, then grow.
    s = make(num_blocks=5, budget=100, max_len=40)
    s.add_request(req("old", 8, max_tokens=10))
    s.add_request(req("new", 8, max_tokens=10, start=50))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"old": 8, "new": 8}
    assert s.kv.block_ids("old") == [0, 1] and s.kv.block_ids("new") == [2, 3]
    # step 2: each has 9 tokens and needs a 3rd block; one is free: old gets it, new
    # (the newest) is preempted, its blocks freed and its progress reset
    out, _ = run_step(s)
    assert s.kv.block_ids("old") == [0, 1, 4]
    assert out.num_scheduled_tokens == {"old": 1}
    assert out.preempted_req_ids == {"new"}
    new = s.waiting[0]
    assert new.request_id == "new" and new.num_computed_tokens == 0 and new.num_preemptions == 1
    assert new.output_token_ids == [7]
    assert s.kv.pool.num_free_blocks == 2
    # run to completion: everything finishes, nothing leaks, outputs have the right length
    finished = {}
    for _ in range(100):
        if not s.has_unfinished():
            break
        _, changed = run_step(s)
        finished.update({r.request_id: r for r in changed if r.is_finished()})
    assert set(finished) == {"old", "new"}
    assert all(len(r.output_token_ids) == 10 for r in finished.values())
    assert s.kv.pool.num_free_blocks == 5


def test_a_step_that_preempts_admits_nothing():
    # priority: w (better than c) waits while a and b need a block each and the pool is full:
    # c is preempted and frees 3 blocks, a and b take one each, and one stays free; w would fit
    # it, but a step that preempted admits nothing (the next step looks at the pool again)
    s = make(num_blocks=7, budget=100, max_len=40, policy="priority")
    s.add_request(req("a", 8, max_tokens=8))
    s.add_request(req("b", 8, max_tokens=8, start=20))
    s.add_request(req("c", 12, max_tokens=8, start=40, priority=1))
    run_step(s)
    assert s.kv.pool.num_free_blocks == 0
    s.add_request(req("w", 3, max_tokens=8, start=60))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1} and out.preempted_req_ids == {"c"}
    assert [r.request_id for r in s.waiting] == ["w", "c"] and s.kv.pool.num_free_blocks == 1
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1, "w": 3} and s.kv.block_ids("w") == [4]


def test_preempted_request_is_resent_in_full():
    s = make(num_blocks=4, budget=100, max_len=40)
    s.add_request(req("a", 8, max_tokens=8))
    s.add_request(req("b", 7, max_tokens=8, start=50))
    run_step(s)                                   # a: blocks 0,1  b: blocks 2,3
    out, _ = run_step(s)                          # a needs block for token 9: b is preempted
    assert out.preempted_req_ids == {"b"}
    assert out.num_scheduled_tokens == {"a": 1}
    assert s.waiting[0].request_id == "b" and s.waiting[0].num_computed_tokens == 0
    while s.requests.get("a") is not None:
        run_step(s)
    out, _ = run_step(s)
    # b resumes: prompt + its sampled output are recomputed, sent as a new request
    (new,) = out.new_requests
    assert new.req_id == "b" and new.token_ids == list(range(50, 57)) + [7]
    assert new.num_computed_tokens == 0


def test_prompt_longer_than_budget_is_chunked_exactly():
    s = make(budget=8, max_len=64)
    s.add_request(req("a", 20))
    sizes = []
    for _ in range(3):
        out, _ = run_step(s)
        sizes.append(out.num_scheduled_tokens["a"])
    assert sizes == [8, 8, 4]
    assert s.requests["a"].output_token_ids == [7]


def test_static_policy_admits_only_when_batch_done():
    s = make(budget=100, policy="static")
    s.add_request(req("a", 4, max_tokens=1))
    s.add_request(req("b", 4, max_tokens=3, start=20))
    out, _ = run_step(s)
    assert set(out.num_scheduled_tokens) == {"a", "b"}
    s.add_request(req("c", 4, start=40))
    out, _ = run_step(s)                          # a finished; b still running: c must wait
    assert set(out.num_scheduled_tokens) == {"b"}
    run_step(s)                                   # b finishes
    out, _ = run_step(s)
    assert set(out.num_scheduled_tokens) == {"c"}


def test_abort_frees_blocks_everywhere():
    s = make(budget=100)
    s.add_request(req("a", 9))
    s.add_request(req("b", 9, start=30))
    run_step(s)
    s.add_request(req("c", 9, start=60))
    s.finish_requests([RequestId("a"), RequestId("c"), RequestId("zzz")], RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in s.running] == ["b"] and not s.waiting
    assert s.kv.pool.num_free_blocks == 64 - 3


def test_static_batch_forms_past_the_token_budget():
    # budget 16, prompts of 12: a continuous step admits one and a chunk of the next; a
    # static batch admits all four at once and prefills them over the following steps
    s = make(budget=16, max_seqs=4, policy="static")
    for i in range(4):
        s.add_request(req(f"r{i}", 12, max_tokens=2, start=20 * i))
    out, _ = run_step(s)
    assert [r.request_id for r in s.running] == ["r0", "r1", "r2", "r3"]
    assert out.num_scheduled_tokens == {"r0": 12, "r1": 4}
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"r0": 1, "r1": 8, "r2": 7}
    s.add_request(req("late", 4, start=200))
    for _ in range(6):
        out, _ = run_step(s)
        assert "late" not in out.num_scheduled_tokens or not any(
            r.request_id.startswith("r") for r in s.running)
    assert s.kv.pool.num_free_blocks + sum(len(s.kv.block_ids(r.request_id)) for r in s.running) == 64


def test_static_batch_limited_by_kv_pool():
    s = make(num_blocks=8, budget=100, max_seqs=8, policy="static")
    for i in range(4):
        s.add_request(req(f"r{i}", 12, max_tokens=2, start=20 * i))   # 4 blocks each with room to grow
    run_step(s)
    assert [r.request_id for r in s.running] == ["r0", "r1"]


def test_priority_policy_admits_lowest_value_first_ties_in_arrival_order():
    s = make(budget=100, max_seqs=2, policy="priority")
    for rid, priority in [("a", 5), ("b", 1), ("c", 5), ("d", -3), ("e", 1)]:
        s.add_request(req(rid, 4, start=10 * ord(rid[0]), priority=priority))
    assert [r.request_id for r in s.waiting] == ["d", "b", "e", "a", "c"]
    out, _ = run_step(s)
    assert list(out.num_scheduled_tokens) == ["d", "b"]
    assert [r.request_id for r in s.running] == ["d", "b"]
    s.finish_requests([RequestId("d")], RequestStatus.FINISHED_ABORTED)
    s.add_request(req("f", 4, start=500, priority=1))   # after e among the 1s
    out, _ = run_step(s)
    assert list(out.num_scheduled_tokens) == ["b", "e"] and [r.request_id for r in s.waiting] == ["f", "a", "c"]


def test_priority_policy_budget_goes_to_the_best_running_request_first():
    # c arrives last but is the most urgent: it is admitted ahead of the others (its prefill
    # first), then it is the running queue's head and takes the budget before them
    s = make(budget=10, max_seqs=4, policy="priority")
    s.add_request(req("a", 8, max_tokens=6, priority=2))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 8}
    s.add_request(req("b", 12, max_tokens=6, start=100, priority=2))
    s.add_request(req("c", 12, max_tokens=6, start=200, priority=0))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 1, "c": 9}
    assert [r.request_id for r in s.running] == ["c", "a"] and [r.request_id for r in s.waiting] == ["b"]
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"c": 3, "a": 1, "b": 6}
    assert [r.request_id for r in s.running] == ["c", "a", "b"]


def test_priority_policy_preempts_the_lowest_priority_not_the_newest():
    # 5 blocks of 4 tokens: "low" (priority 9) came first, "high" (priority 0) second; when
    # both need a third block, FCFS would evict the newest (high); priority evicts low
    s = make(num_blocks=5, budget=100, max_len=40, policy="priority")
    s.add_request(req("low", 8, max_tokens=10, priority=9))
    s.add_request(req("high", 8, max_tokens=10, start=50, priority=0))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"high": 8, "low": 8}
    assert s.kv.block_ids("high") == [0, 1] and s.kv.block_ids("low") == [2, 3]
    out, _ = run_step(s)
    assert s.kv.block_ids("high") == [0, 1, 4] and out.num_scheduled_tokens == {"high": 1}
    assert out.preempted_req_ids == {"low"} and s.waiting[0].request_id == "low"
    finished = []
    for _ in range(100):
        if not s.has_unfinished():
            break
        _, changed = run_step(s)
        finished += [r.request_id for r in changed if r.is_finished()]
    assert finished == ["high", "low"] and s.kv.pool.num_free_blocks == 5


def test_priority_policy_preempted_request_waits_behind_better_ones():
    # a preempted request goes back at its place by (priority, arrival), not at the head
    s = make(num_blocks=5, budget=100, max_len=40, max_seqs=2, policy="priority")
    s.add_request(req("low", 8, max_tokens=10, priority=9))
    s.add_request(req("high", 8, max_tokens=10, start=50, priority=0))
    run_step(s)
    s.add_request(req("mid", 4, max_tokens=2, start=90, priority=5))
    out, _ = run_step(s)
    assert out.preempted_req_ids == {"low"}
    assert [r.request_id for r in s.waiting] == ["mid", "low"]


def test_parallel_samples_share_their_parents_place():
    s = make(budget=100, max_seqs=8, policy="priority")
    s.add_request(req("late", 4, priority=0))
    parent = req("p", 4, start=40, priority=0)
    forks = [req("p-1", 4, start=40, priority=0)]
    s.add_request(parent, forks)
    assert forks[0].arrival_index == parent.arrival_index == 2
    out, _ = run_step(s)
    assert [r.request_id for r in s.running] == ["late", "p", "p-1"]


def test_a_long_prefill_leaves_a_short_prompt_room_in_the_next_step():
    # budget 16: a 40-token prompt would take every step's budget until its prefill ends
    s = make(budget=16, max_len=64)
    s.add_request(req("long", 40))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"long": 16}
    s.add_request(req("short", 5, start=100))
    out, _ = run_step(s)
    # 24 left (> half the budget): it leaves the short prompt its 5 tokens
    assert out.num_scheduled_tokens == {"long": 11, "short": 5}
    assert s.requests["short"].output_token_ids == [7]
    out, _ = run_step(s)   # nothing waits: the whole budget again
    assert out.num_scheduled_tokens == {"long": 13, "short": 1}
    assert s.requests["long"].output_token_ids == [7]


def test_a_long_prefill_leaves_at_most_half_the_budget():
    s = make(budget=16, max_len=64)
    s.add_request(req("long", 48))
    run_step(s)
    s.add_request(req("mid", 20, start=100))   # shorter than the 32 left, longer than half the budget
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"long": 8, "mid": 8}


def test_a_waiting_prompt_as_long_as_the_prefill_keeps_its_place():
    s = make(budget=16, max_len=64)
    s.add_request(req("long", 40))
    run_step(s)                                   # 24 left
    s.add_request(req("longer", 30, start=100))   # it waits its turn, first in the queue
    s.add_request(req("short", 3, start=200))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"long": 13, "short": 3}
    assert [r.request_id for r in s.waiting] == ["longer"]
    s2 = make(budget=16, max_len=64)              # nothing shorter waits: the budget as before
    s2.add_request(req("long", 40))
    run_step(s2)
    s2.add_request(req("longer", 30, start=100))
    out, _ = run_step(s2)
    assert out.num_scheduled_tokens == {"long": 16}
    out, _ = run_step(s2)
    assert out.num_scheduled_tokens == {"long": 8, "longer": 8}


def test_a_short_prefill_and_decodes_leave_nothing():
    s = make(budget=16, max_len=64)
    s.add_request(req("a", 12))   # 12 > half, but the whole prompt in one step
    s.add_request(req("b", 6, start=100))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"a": 12, "b": 4}
    s.add_request(req("c", 3, start=200))
    out, _ = run_step(s)   # b's 2 left: nothing long runs, c joins as before
    assert out.num_scheduled_tokens == {"a": 1, "b": 2, "c": 3}


def test_priority_policy_a_long_prefill_leaves_room_only_to_no_worse_prompts():
    s = make(budget=16, max_len=64, policy="priority")
    s.add_request(req("long", 40, priority=1))
    run_step(s)
    s.add_request(req("worse", 3, start=100, priority=2))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"long": 16}
    s.add_request(req("equal", 3, start=200, priority=1))
    out, _ = run_step(s)   # 8 left: no longer long, "equal" joins with what is left
    assert out.num_scheduled_tokens == {"long": 8, "equal": 3, "worse": 3}
    s = make(budget=16, max_len=64, policy="priority")
    s.add_request(req("long", 40, priority=1))
    run_step(s)
    s.add_request(req("longer", 30, start=100, priority=0))   # better, and waits its turn
    s.add_request(req("short", 3, start=200, priority=1))     # worse than it: does not pass it
    s.add_request(req("best", 3, start=300, priority=0))      # no worse: passes it
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"long": 13, "best": 3}
    assert [r.request_id for r in s.waiting] == ["longer", "short"]


def test_static_policy_never_yields():
    s = make(budget=16, max_len=64, policy="static")
    s.add_request(req("long", 40))
    run_step(s)
    s.add_request(req("short", 5, start=100))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"long": 16}


def test_a_long_prefill_leaves_the_decodes_behind_it_their_tokens():
    s = make(budget=16, max_len=64)
    s.add_request(req("long", 48))
    run_step(s)
    s.add_request(req("short", 5, start=100))
    s.add_request(req("other", 2, start=200))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"long": 9, "short": 5, "other": 2}
    out, _ = run_step(s)   # 23 left, nothing waits: the two decodes behind it still get theirs
    assert out.num_scheduled_tokens == {"long": 14, "short": 1, "other": 1}


def test_a_long_prefill_behind_older_rows_still_gets_half_of_what_is_left():
    s = make(budget=16, max_len=64, max_seqs=16)
    for i in range(10):
        s.add_request(req(f"d{i}", 1, max_tokens=20, start=10 * i))
    s.add_request(req("long", 40, start=500))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {**{f"d{i}": 1 for i in range(10)}, "long": 6}
    s.add_request(req("short", 5, start=600))
    out, _ = run_step(s)   # 6 left after the decodes, 5 reserved: it takes half of the 6
    assert out.num_scheduled_tokens == {**{f"d{i}": 1 for i in range(10)}, "long": 3, "short": 3}
