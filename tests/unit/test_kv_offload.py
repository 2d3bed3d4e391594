"""The host tier of the KV cache: exact block ids and copy lists for swap-out, swap-in and
host prefix hits, fallback to recompute, abort while swapped out, no leak in either pool,
and the worker's copies (CPU: both pools are plain tensors)."""
from __future__ import annotations

import torch

from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestId, RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.engine_io import ModelRunnerOutput, SchedulerOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.host_kv_cache import HostKVCache

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
    assert m.take_swaps() == ([(0, 0), (1, 1), (2, 2)], [])
    assert m.pool.num_free_blocks == 8 and m.host.num_free_blocks == 1
    a.output_token_ids.append(5)                        # resumes with 11 tokens, 10 computed
    assert m.allocate_slots(a, 1)
    # the full blocks 0, 1 are still cached on the device (free, at the LRU tail): shared
    # again; only the partial block comes back from the host
    assert ids(m, a) == [0, 1, 3]
    assert m.take_swaps() == ([], [(2, 3)]) and m.is_loading(a) is False
    assert m.host.num_free_blocks == 4 and not m.req_to_host_blocks
    # the host copies of the full blocks stay findable: the host tier's prefix entries
    assert sorted(m.host.cached) == sorted(m.req_to_hashes["a"])
    assert (m.stats.blocks_swapped_out, m.stats.blocks_swapped_in) == (3, 1)


def test_swap_in_loads_every_block_the_device_lost():
    m = KVCacheManager(4, B, num_host_blocks=4)
    a = req("a", list(range(10)))
    assert m.allocate_slots(a, 10) and ids(m, a) == [0, 1, 2]
    a.num_computed_tokens = 10
    assert m.swap_out(a) and m.take_swaps() == ([(0, 0), (1, 1), (2, 2)], [])
    b = req("b", list(range(100, 116)))                 # takes every device block
    assert m.allocate_slots(b, 16) and m.take_swaps() == ([], [])   # a's copies are on the host already
    m.forget(b)
    a.output_token_ids.append(5)
    assert m.allocate_slots(a, 1) and ids(m, a) == [0, 1, 2]
    assert m.is_loading(a)
    # b's evicted blocks 0, 1, 2 take turns in the one free host block (the last one stays);
    # device 2 is read (swap-out) before it is written (swap-in)
    assert m.take_swaps() == ([(2, 3)], [(0, 0), (1, 1), (2, 2)])


def test_evicted_prefix_goes_to_host_and_comes_back():
    m = KVCacheManager(4, B, num_host_blocks=4)
    a = req("a", list(range(9)))                        # blocks 0, 1 full and hashed; 2 partial
    assert m.allocate_slots(a, 9) and ids(m, a) == [0, 1, 2]
    m.forget(a)                                         # free queue: 3, 2, 1, 0
    b = req("b", list(range(100, 116)))                 # takes all 4 blocks: evicts 1 and 0
    assert m.allocate_slots(b, 16) and ids(m, b) == [3, 2, 1, 0]
    assert m.take_swaps() == ([(1, 0), (0, 1)], [])     # (device, host) offloads
    m.forget(b)                                         # free queue: 0, 1, 2, 3 (all hashed)
    c = req("c", list(range(9)))                        # a's prompt again: a device miss, a host hit
    hits, num = m.get_computed_blocks(c)
    assert [(h.block_id, h.on_host) for h in hits] == [(1, True), (0, True)] and num == 8
    assert m.allocate_slots(c, 1, hits)
    assert ids(m, c) == [0, 1, 2] and m.is_loading(c)
    # b's evicted blocks 0, 1, 2 go to the two free host blocks (the host hits are held), LRU:
    # 2 takes the host block 0 had, and only its copy is queued. Swap-outs run first, so
    # device blocks 1 and 2 are read before the swap-ins write 0 and 1.
    assert m.take_swaps() == ([(1, 3), (2, 2)], [(1, 0), (0, 1)])
    # c runs from the next step: until then its loading blocks serve no device prefix hit
    assert m.is_loading(c) is False and m.pool.blocks[0].block_hash is None
    c.num_computed_tokens = 8
    assert m.allocate_slots(c, 1) and ids(m, c) == [0, 1, 2]
    assert m.pool.blocks[0].block_hash is not None and m.take_swaps() == ([], [])
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


def test_a_failed_step_drops_the_host_copies_it_was_to_write():
    s = make()
    out = two_requests(s)
    s.drop_swaps(out)
    new = s.waiting[0]
    assert new.num_computed_tokens == 0 and not s.kv.is_swapped(new)
    assert s.kv.host.num_free_blocks == 8


def test_host_cache_copies_blocks_both_ways_on_cpu():
    device = torch.randn(4, 6, B, 2, 3)                 # [planes, blocks, block_size, heads, dim]
    before = device.clone()
    cache = HostKVCache(device, 5)
    cache.swap([(1, 3), (4, 0)], [])
    assert torch.equal(cache.host[:, 3], before[:, 1]) and torch.equal(cache.host[:, 0], before[:, 4])
    # out first, then in: device block 1 is read before it is overwritten
    cache.swap([(1, 2)], [(3, 5), (0, 1)])
    assert torch.equal(cache.host[:, 2], before[:, 1])
    assert torch.equal(device[:, 5], before[:, 1]) and torch.equal(device[:, 1], before[:, 4])
    assert torch.equal(device[:, [0, 2, 3, 4]], before[:, [0, 2, 3, 4]])


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


def test_the_staged_fallback_copies_the_same_blocks():
    """The CUDA fallback's gather -> transfer -> scatter, run on CPU tensors, in chunks."""
    import pagedserve.worker.host_kv_cache as host_kv_cache
    device = torch.randn(4, 6, B, 2, 3)
    cache = HostKVCache(device, 5)
    chunk, host_kv_cache._STAGED_CHUNK_BYTES = host_kv_cache._STAGED_CHUNK_BYTES, 1   # one block per chunk
    try:
        cache._staged(cache._device_words, cache._host_words, [(1, 3), (4, 0)])
        cache._staged(cache._host_words, cache._device_words, [(3, 5)])
    finally:
        host_kv_cache._STAGED_CHUNK_BYTES = chunk
    assert torch.equal(cache.host[:, 3], device[:, 1]) and torch.equal(cache.host[:, 0], device[:, 4])
    assert torch.equal(device[:, 5], device[:, 1])
