"""The host tier of the KV cache: exact block ids and copy lists for swap-out, swap-in and
host prefix hits, fallback to recompute, abort while swapped out, no leak in either pool.
The worker's side (the host pool's memory and copies): test_host_kv_cache.py."""
from __future__ import annotations

from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestId, RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.engine_io import ModelRunnerOutput, SchedulerOutput
from pagedserve.sampling_params import SamplingParams

B = 4


def req(rid: str, tokens: list[int], max_tokens: int = 8) -> Request:
    return Request(RequestId(rid), tokens, SamplingParams(max_tokens=max_tokens), max_tokens=max_tokens)


def ids(m: KVCacheManager, request: Request) -> list[int]:
    return m.block_ids(request.request_id)


def test_swap_out_then_in_exact_blocks_and_copies():
    m = KVCacheManager(8, B, num_host_blocks=4)
    a = req("a", list(range(10)))                       # 3 blocks, 2 of them full and hashed
    assert m.allocate_slots(a, 10) and ids(m, a) == [0, 1, 2]
    a.num_computed_tokens = 10
    assert m.swap_out(a)
    assert [b.block_id for b in m.req_to_host_blocks["a"]] == [0, 1, 2]
    # the full blocks stay in the device prefix cache: host blocks 0, 1 are only reserved for
    # them; the partial block is copied now
    assert m.take_swaps() == ([(2, 2)], [], 0)
    assert {h: b.block_id for h, b in m._pending.items()} == dict(zip(m.req_to_hashes["a"], [0, 1]))
    assert m.pool.num_free_blocks == 8 and m.host.num_free_blocks == 1
    a.output_token_ids.append(5)                        # resumes with 11 tokens, 10 computed
    assert m.allocate_slots(a, 1)
    # the full blocks 0, 1 are still cached on the device (free, at the LRU tail): shared
    # again; only the partial block comes back from the host
    assert ids(m, a) == [0, 1, 3]
    assert m.take_swaps() == ([], [(2, 3)], 0) and m.is_loading(a) is False
    # the unused reservations end: nothing pending, every host block free, none cached
    assert m.host.num_free_blocks == 4 and not m.req_to_host_blocks and not m._pending and not m._reserved
    assert not m.host.cached
    assert (m.stats.blocks_swapped_out, m.stats.blocks_swapped_in) == (1, 1)


def test_swap_in_loads_every_block_the_device_lost():
    m = KVCacheManager(4, B, num_host_blocks=4)
    a = req("a", list(range(10)))
    assert m.allocate_slots(a, 10) and ids(m, a) == [0, 1, 2]
    assert m.take_swaps() == ([], [], 0)               # a step ends: free 3 is not hashed
    a.num_computed_tokens = 10
    # the partial block is copied; a's block 1, within the 3 blocks next in line (the last
    # step handed out 3), is written behind to its reserved host block at once
    assert m.swap_out(a) and m.take_swaps() == ([(2, 2), (1, 1)], [], 1)
    b = req("b", list(range(100, 116)))                 # takes every device block
    # evicting block 1 copies nothing (the host has it); evicting block 0 writes it to the
    # host block reserved for it
    assert m.allocate_slots(b, 16) and ids(m, b) == [3, 2, 1, 0]
    assert m.take_swaps() == ([(0, 0)], [], 0) and not m._pending
    m.forget(b)
    a.output_token_ids.append(5)
    assert m.allocate_slots(a, 1) and ids(m, a) == [0, 1, 2]
    assert m.is_loading(a)
    # b's evicted blocks 0, 1, 2 take turns in the one free host block, and then device 3,
    # next in line for eviction (3 blocks were handed out), takes it as a write-behind copy
    # that runs after the swap-ins (the last writer of host block 3 wins)
    assert m.take_swaps() == ([(3, 3)], [(0, 0), (1, 1), (2, 2)], 1)


def test_resume_shares_what_the_device_kept_and_loads_the_rest_in_table_order():
    m = KVCacheManager(5, B, num_host_blocks=4)
    a = req("a", list(range(10)))
    assert m.allocate_slots(a, 10) and ids(m, a) == [0, 1, 2]
    assert m.take_swaps() == ([], [], 0)
    a.num_computed_tokens = 10
    assert m.preempt(a, swap=True) and m.take_swaps() == ([(2, 2)], [], 0)   # host 0, 1 reserved
    b = req("b", list(range(100, 116)))
    # b gets 3, 4, 2 and then a's block 1, whose eviction writes it to its reserved host block;
    # a's block 0, next in line, is written behind (it stays cached on the device)
    assert m.allocate_slots(b, 16) and ids(m, b) == [3, 4, 2, 1]
    assert m.take_swaps() == ([(1, 1), (0, 0)], [], 1)
    assert not m._pending and m.pool.blocks[0].block_hash is not None
    m.forget(b)                                         # free queue: 0 (a's), 1, 2, 4, 3 (b's)
    a.output_token_ids.append(5)
    assert m.allocate_slots(a, 1)
    # block 0 is still a's first block on the device: shared; host 1 and 2 land in fresh
    # blocks 1 and 2 (b's evicted blocks, then the two next in line, take turns in free
    # host block 3: the last, written behind, wins)
    assert ids(m, a) == [0, 1, 2] and m.is_loading(a)
    assert m.take_swaps() == ([(3, 3)], [(1, 1), (2, 2)], 1)
    assert not m._pending and not m._reserved and m.host.num_free_blocks == 4
    assert m.stats.preempted_tokens == 10
    assert (m.stats.resumed_device_tokens, m.stats.resumed_host_tokens) == (4, 6)
    m.forget(a)
    assert m.pool.num_free_blocks == 5


def test_swapped_requests_share_one_reservation_written_once():
    m = KVCacheManager(6, B, num_host_blocks=6)
    a, c = req("a", list(range(6))), req("c", list(range(4)) + [50, 51])   # first block shared
    assert m.allocate_slots(a, 6) and ids(m, a) == [0, 1]
    hits, _ = m.get_computed_blocks(c)
    assert m.allocate_slots(c, 2, hits) and ids(m, c) == [0, 2]
    a.num_computed_tokens = c.num_computed_tokens = 6
    assert m.preempt(a, swap=True) and m.preempt(c, swap=True)
    assert [b.block_id for b in m.req_to_host_blocks["a"]] == [0, 1]
    assert [b.block_id for b in m.req_to_host_blocks["c"]] == [0, 2]   # host 0 reserved for both
    assert m.host.blocks[0].ref_cnt == 2 and m.take_swaps() == ([(1, 1), (2, 2)], [], 0)
    d = req("d", list(range(100, 124)))                 # all 6 device blocks: block 0 is written once
    assert m.allocate_slots(d, 24) and m.take_swaps() == ([(0, 0)], [], 0)
    m.forget(d)
    a.output_token_ids.append(9)
    assert m.allocate_slots(a, 1) and len(m.take_swaps()[1]) == 2
    assert m.host.blocks[0].ref_cnt == 1 and m.host.blocks[0].block_hash is not None   # c still holds it
    m.forget(c)
    m.forget(a)
    assert m.host.num_free_blocks == 6 and m.pool.num_free_blocks == 6 and not m._pending


def test_uncaching_a_reserved_block_writes_it_first():
    """A running request sharing a swapped request's pending block fails a step: the block
    leaves the device prefix cache, so its KV goes to the reserved host block first."""
    m = KVCacheManager(6, B, num_host_blocks=4)
    a = req("a", list(range(6)))
    assert m.allocate_slots(a, 6) and ids(m, a) == [0, 1]
    a.num_computed_tokens = 6
    assert m.preempt(a, swap=True) and m.take_swaps() == ([(1, 1)], [], 0)
    c = req("c", list(range(4)) + [70, 71])
    hits, _ = m.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0] and m.allocate_slots(c, 2, hits)
    m.uncache(c)
    assert m.take_swaps() == ([(0, 0)], [], 0) and not m._pending
    m.forget(c)
    a.output_token_ids.append(9)
    assert m.allocate_slots(a, 1) and ids(m, a) == [3, 4]   # nothing left on the device: both loaded
    assert m.take_swaps() == ([], [(0, 3), (1, 4)], 0)


def test_recompute_counts_what_the_device_prefix_cache_gives_back():
    m = KVCacheManager(8, B)
    a = req("a", list(range(10)))
    assert m.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    assert not m.preempt(a, swap=True)                  # no host tier: recompute
    a.num_computed_tokens = 0
    a.output_token_ids.append(5)
    hits, num = m.get_computed_blocks(a)
    assert num == 8 and m.allocate_slots(a, 3, hits)
    assert (m.stats.preempted_tokens, m.stats.resumed_device_tokens, m.stats.resumed_host_tokens) == (10, 8, 0)


def test_write_behind_copies_the_blocks_next_in_line_so_their_eviction_copies_nothing():
    m = KVCacheManager(6, B, num_host_blocks=8)
    a = req("a", list(range(16)))                       # 4 full blocks
    assert m.allocate_slots(a, 16) and ids(m, a) == [0, 1, 2, 3]
    assert m.take_swaps() == ([], [], 0)                # free 4, 5 are not hashed
    m.forget(a)                                         # free queue: 4, 5, 3, 2, 1, 0
    b = req("b", list(range(100, 108)))
    assert m.allocate_slots(b, 8) and ids(m, b) == [4, 5]
    # the window is the most blocks a recent step handed out (4): a's blocks, still cached,
    # are written behind, in eviction order
    assert m.take_swaps() == ([(3, 0), (2, 1), (1, 2), (0, 3)], [], 4)
    assert m.pool.blocks[3].block_hash is not None and m.stats.blocks_offloaded == 4
    c = req("c", list(range(200, 208)))
    assert m.allocate_slots(c, 8) and ids(m, c) == [3, 2]
    assert m.take_swaps() == ([], [], 0)                # their eviction copies nothing
    assert sorted(b.block_id for b in m.host.cached.values()) == [0, 1, 2, 3]
    assert m.stats.blocks_swapped_out == 4


def test_evicted_prefix_goes_to_host_and_comes_back():
    m = KVCacheManager(4, B, num_host_blocks=4)
    a = req("a", list(range(9)))                        # blocks 0, 1 full and hashed; 2 partial
    assert m.allocate_slots(a, 9) and ids(m, a) == [0, 1, 2]
    m.forget(a)                                         # free queue: 3, 2, 1, 0
    b = req("b", list(range(100, 116)))                 # takes all 4 blocks: evicts 1 and 0
    assert m.allocate_slots(b, 16) and ids(m, b) == [3, 2, 1, 0]
    assert m.take_swaps() == ([(1, 0), (0, 1)], [], 0)     # (device, host) offloads
    m.forget(b)                                         # free queue: 0, 1, 2, 3 (all hashed)
    c = req("c", list(range(9)))                        # a's prompt again: a device miss, a host hit
    hits, num = m.get_computed_blocks(c)
    assert [(h.block_id, h.on_host) for h in hits] == [(1, True), (0, True)] and num == 8
    assert m.allocate_slots(c, 1, hits)
    assert ids(m, c) == [0, 1, 2] and m.is_loading(c)
    # b's evicted blocks 0, 1, 2 go to the two free host blocks (the host hits are held), LRU:
    # 2 takes the host block 0 had, and only its copy is queued; device 3, next in line, is
    # written behind into the host block 1 had. Swap-outs run first, so device block 2 is
    # read before the swap-ins write 0 and 1; the write-behind runs last.
    assert m.take_swaps() == ([(2, 2), (3, 3)], [(1, 0), (0, 1)], 1)
    # c runs from the next step: until then its loading blocks serve no device prefix hit
    assert m.is_loading(c) is False and m.pool.blocks[0].block_hash is None
    c.num_computed_tokens = 8
    assert m.allocate_slots(c, 1) and ids(m, c) == [0, 1, 2]
    assert m.pool.blocks[0].block_hash is not None and m.take_swaps() == ([], [], 0)
    assert m.stats.host_hits == 8 and m.stats.hits == 8
    assert m.host.num_free_blocks == 4


def make(num_blocks=5, host_blocks=8, mode="swap", caching=False) -> Scheduler:
    """Prefix caching off by default: resumed requests then load every block from the host."""
    return Scheduler(KVCacheManager(num_blocks, B, caching, num_host_blocks=host_blocks), 8, 100, 40,
                     preemption_mode=mode)


def run_step(s: Scheduler) -> SchedulerOutput:
    out = s.schedule()
    sampled = {rid: 7 for rid, n in out.num_scheduled_tokens.items()
               if s.requests[rid].num_computed_tokens + n == s.requests[rid].num_tokens}
    s.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))
    return out


def two_requests(s: Scheduler) -> SchedulerOutput:
    """old: blocks 0, 1; new: 2, 3; step 2 needs a 3rd block each: new is preempted."""
    s.add_request(req("old", list(range(8)), max_tokens=10))
    s.add_request(req("new", list(range(50, 58)), max_tokens=10))
    run_step(s)
    return run_step(s)


def test_preemption_by_swap_resumes_with_computed_tokens_and_leaks_nothing():
    s = make()
    out = two_requests(s)
    assert out.preempted_req_ids == {"new"} and out.num_scheduled_tokens == {"old": 1}
    assert out.blocks_to_swap_out == [(2, 0), (3, 1)] and out.blocks_to_swap_in == []
    new = s.waiting[0]
    assert new.num_computed_tokens == 8 and s.kv.is_swapped(new) and s.stats.num_swapped == 1
    steps = []
    for _ in range(40):
        steps.append(run_step(s))
        if not s.has_unfinished():
            break
    loading = next(i for i, out in enumerate(steps) if out.blocks_to_swap_in)
    # old finished; new's blocks come back to fresh device blocks 2, 3 from host blocks 0, 1
    # while that step's forward runs (new is not in it), and new runs from the next step on,
    # computing only its sampled token
    assert steps[loading].blocks_to_swap_in == [(0, 2), (1, 3)]
    assert "new" not in steps[loading].num_scheduled_tokens
    (data,) = steps[loading + 1].new_requests
    assert data.req_id == "new" and data.num_computed_tokens == 8 and data.block_ids == [2, 3, 4]
    assert steps[loading + 1].num_scheduled_tokens == {"new": 1}
    assert s.kv.pool.num_free_blocks == 5 and s.kv.host.num_free_blocks == 8
    assert s.kv.host_usage() == 0.0 and not s.kv.req_to_host_blocks


def test_full_host_tier_falls_back_to_recompute():
    s = make(host_blocks=1)
    out = two_requests(s)
    assert out.preempted_req_ids == {"new"} and out.blocks_to_swap_out == []
    assert s.waiting[0].num_computed_tokens == 0 and not s.kv.is_swapped(s.waiting[0])


def test_recompute_mode_never_swaps():
    s = make(mode="recompute")
    out = two_requests(s)
    assert out.preempted_req_ids == {"new"} and out.blocks_to_swap_out == []
    assert s.waiting[0].num_computed_tokens == 0


def test_abort_while_swapped_out_frees_host_blocks():
    s = make()
    two_requests(s)
    assert s.kv.host.num_free_blocks == 6
    s.finish_requests([RequestId("new")], RequestStatus.FINISHED_ABORTED)
    assert s.kv.host.num_free_blocks == 8 and not s.kv.req_to_host_blocks


def test_abort_while_swapped_out_ends_its_reservations():
    """Prefix caching on: the preempted request's full blocks are only reserved on the host;
    aborting it frees them and ends the reservations."""
    m = KVCacheManager(8, B, num_host_blocks=4)
    a = req("a", list(range(8)))                        # 2 full blocks
    assert m.allocate_slots(a, 8) and m.take_swaps() == ([], [], 0)
    a.num_computed_tokens = 8
    # free queue 2..7, then a's 1, 0: the 2-block window reaches no hashed block
    assert m.preempt(a, swap=True) and m.take_swaps() == ([], [], 0)
    assert sorted(b.block_id for b in m._pending.values()) == [0, 1] and m.host.num_free_blocks == 2
    m.forget(a)
    assert m.host.num_free_blocks == 4 and not m._pending and not m._reserved


def test_preempted_blocks_next_in_line_are_written_behind():
    """Prefix caching on, a pool so small that the preempted request's blocks are next in
    line for eviction: the step that preempts it writes them behind at once."""
    s = make(caching=True)
    out = two_requests(s)
    assert out.preempted_req_ids == {"new"}
    assert (out.blocks_to_swap_out, out.num_swap_out_behind) == ([(3, 1), (2, 0)], 2)
    assert not s.kv._pending
    s.finish_requests([RequestId("new")], RequestStatus.FINISHED_ABORTED)
    assert s.kv.host.num_free_blocks == 8


def test_a_failed_step_drops_the_host_copies_it_was_to_write():
    s = make()
    out = two_requests(s)
    s.drop_swaps(out)
    new = s.waiting[0]
    assert new.num_computed_tokens == 0 and not s.kv.is_swapped(new)
    assert s.kv.host.num_free_blocks == 8


def test_a_failed_step_recomputes_the_requests_it_was_to_load():
    s = make()
    two_requests(s)
    s.finish_requests([RequestId("old")], RequestStatus.FINISHED_ABORTED)
    out = run_step(s)                                   # new's blocks are loaded; it runs next step
    assert out.blocks_to_swap_in == [(0, 3), (1, 2)] and not out.num_scheduled_tokens
    s.drop_swaps(out)
    new = s.waiting[0]
    assert new.request_id == "new" and new.num_computed_tokens == 0 and not s.running
    assert s.kv.pool.num_free_blocks == 5 and s.kv.host.num_free_blocks == 8
