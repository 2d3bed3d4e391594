"""The host tier of the KV cache: exact block ids and copy lists for swap-out, swap-in and
host prefix hits, fallback to recompute, abort while swapped out, no leak in either pool,
and the worker's copies (CPU: both pools are plain tensors)."""
from __future__ import annotations

import time

import pytest
import torch

from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestId, RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.engine_io import ModelRunnerOutput, SchedulerOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.host_kv_cache import HostKVCache, check_blocks, pin_chunks

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


def test_write_behind_copies_run_after_the_swap_ins_on_cpu():
    device = torch.randn(4, 6, B, 2, 3)
    before = device.clone()
    cache = HostKVCache(device, 5)
    # swap-out 1 -> host 2; swap-in host 2 -> device 3; write-behind 3 -> host 4 (after the
    # swap-in: host 4 gets device 1's data, through 3)
    cache.swap([(1, 2), (3, 4)], [(2, 3)], 1)
    assert torch.equal(cache.host[:, 2], before[:, 1]) and torch.equal(cache.host[:, 4], before[:, 1])
    assert torch.equal(device[:, 3], before[:, 1])


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


def test_the_host_pool_is_pinned_from_start_up_or_the_first_swap_not_a_step(monkeypatch):
    """On CUDA the pool's pinning (which stalls every other CUDA call while a chunk registers)
    starts when the runner's start-up ends (start_pinning), or at the first swap if nothing
    started it: the per-step await_loads does not; starting twice starts once. The CUDA stream
    calls are stood in for (no copies: empty lists)."""
    import contextlib
    from types import SimpleNamespace

    cache = HostKVCache(torch.zeros(4, 6, B, 2, 3), 5)
    started = []
    monkeypatch.setattr(cache, "_start_pinning", lambda: started.append(True))
    cache.stream = SimpleNamespace(wait_stream=lambda stream: None)   # as on CUDA
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    for _ in range(3):
        cache.await_loads()
    assert not started and cache.copy_mode == "staged until pinned (in the background, from the end of start-up)"
    cache.swap([], [])
    assert started == [True]
    other = HostKVCache(torch.zeros(4, 6, B, 2, 3), 5)
    monkeypatch.setattr(other, "_start_pinning", lambda: (started.append("other"), setattr(other, "_pin_started", True)))
    other.start_pinning()   # on the CPU (no stream) nothing is pinned
    assert started == [True]
    other.stream = cache.stream
    other.start_pinning()
    other.start_pinning()
    assert started == [True, "other"]


def test_background_pinning_cuts_the_pool_at_chunk_multiples():
    """The chunks registered one by one tile the pool exactly and never share a page."""
    assert pin_chunks(1000, 5000, chunk=1024) == [(1000, 1024), (1024, 2048), (2048, 3072), (3072, 4096),
                                                  (4096, 5120), (5120, 6000)]
    assert pin_chunks(2048, 1024, chunk=1024) == [(2048, 3072)]
    assert pin_chunks(2048, 1000, chunk=1024) == [(2048, 3048)]


def test_the_mapped_view_check_covers_blocks_across_chunk_edges(monkeypatch):
    """2 planes of 10 blocks of 100 bytes at 1000 (2000 bytes), chunks of 512: edges at 1024,
    1536, 2048, 2560 fall in plane 0 block 0 and 5, plane 1 block 0 and 5."""
    import pagedserve.worker.host_kv_cache as host_kv_cache
    monkeypatch.setattr(host_kv_cache, "_PIN_CHUNK_BYTES", 512)
    assert check_blocks(1000, 2000, 2, 10) == [0, 5, 9]
    assert check_blocks(1000, 2000, 2, 10, most=1) == [0, 9]


@pytest.mark.parametrize("inference", [False, True])
def test_background_pinning_registers_every_chunk_and_unregisters_on_close(monkeypatch, inference):
    """The pinning thread's bookkeeping, with the CUDA calls replaced by a log: every chunk
    registered in order, each chunk's pages touched first (one zero byte a page, from the
    chunk's start; nothing else written), all unregistered on close. Also started under
    inference mode (as the runner starts it, at a step's first swap; the thread itself is not
    in the mode): on the GPU the touch of that view failed and swaps fell back to staged copies."""
    import mmap

    import pagedserve.worker.host_kv_cache as host_kv_cache
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    raw = torch.full((2 * mmap.PAGESIZE + 100,), 7, dtype=torch.uint8)
    base = raw.data_ptr()

    def register(pointer, nbytes):
        calls.append(("reg", pointer - base, nbytes))
        # touched before it is registered: the chunk's page-stride bytes are already zero
        assert not raw[pointer - base:pointer - base + nbytes:mmap.PAGESIZE].any()

    monkeypatch.setattr(host_kv_cache, "_register", register)
    monkeypatch.setattr(host_kv_cache, "_unregister", lambda pointer: calls.append(("unreg", pointer - base)))
    chunk = mmap.PAGESIZE
    with torch.inference_mode(inference):
        pinning = host_kv_cache._Pinning(raw, torch.device("cpu"), chunk=chunk, pause=0.0)
    assert pinning.done.wait(10) and pinning.ok and pinning.error is None
    starts = [start - base for start, _ in host_kv_cache.pin_chunks(base, raw.numel(), chunk)]
    assert [c[1] for c in calls] == starts and sum(c[2] for c in calls) == raw.numel()
    touched = {i for start, (_, _, n) in zip(starts, calls) for i in range(start, start + n, mmap.PAGESIZE)}
    assert all(raw[i].item() == (0 if i in touched else 7) for i in range(raw.numel()))
    assert pinning._raw is None   # the thread let go of the pool
    pinning.close()
    assert calls[len(starts):] == [("unreg", s) for s in starts] and not pinning.chunks


def test_background_pinning_pauses_after_each_registration(monkeypatch):
    """After each cudaHostRegister the thread sleeps `pause` times as long as it took (other
    threads' CUDA calls wait while one runs): 4 registrations of >= 5 ms with pause 3 take
    >= 4 x 20 ms in all."""
    import pagedserve.worker.host_kv_cache as host_kv_cache
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(host_kv_cache, "_register", lambda pointer, nbytes: time.sleep(0.005))
    monkeypatch.setattr(host_kv_cache, "_unregister", lambda pointer: None)
    raw = torch.zeros(4096, dtype=torch.uint8)
    pinning = host_kv_cache._Pinning(raw, torch.device("cpu"), chunk=1024, touch=False, pause=3.0)
    assert pinning.done.wait(10) and pinning.ok
    assert len(pinning.chunks) in (4, 5) and pinning.register_seconds >= 0.005 * len(pinning.chunks)
    assert pinning.seconds >= 4 * pinning.register_seconds * 0.99
    pinning.close()


def _as_on_cuda(monkeypatch, cache: HostKVCache) -> None:
    """Stand-ins for the CUDA stream calls of swap() and for the registrations (no copies run:
    the tests pass empty lists or count on the staged path's CPU tensors)."""
    import contextlib
    from types import SimpleNamespace

    import pagedserve.worker.host_kv_cache as host_kv_cache
    cache.stream = SimpleNamespace(wait_stream=lambda stream: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(wait_stream=lambda s: None))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(host_kv_cache, "_register", lambda pointer, nbytes: None)
    monkeypatch.setattr(host_kv_cache, "_unregister", lambda pointer: None)


def test_the_mapped_view_is_made_and_checked_in_the_pinning_thread(monkeypatch):
    """The check of the pinned pool's mapped view (a round trip through the copy kernel: a
    Triton compile on a cold cache, and host pattern work) runs in the pinning thread, under
    the pool lock; the engine's swap only adopts its result. A failed check leaves staged
    copies, with its error."""
    import threading

    import pagedserve.worker.host_kv_cache as host_kv_cache
    calls = []
    view = torch.zeros(3)

    def check(raw, *, host, device, num_blocks, lock):
        calls.append((threading.get_ident(), lock is cache._pool_lock, num_blocks, raw.numel() == host.numel() * 4))
        return view

    monkeypatch.setattr(host_kv_cache, "_map_pool", check)
    cache = HostKVCache(torch.zeros(4, 6, B, 2, 3), 5)
    _as_on_cuda(monkeypatch, cache)
    cache.start_pinning()
    pinning = cache._pinning
    assert pinning.done.wait(10) and cache.copy_mode == "staged"   # not adopted yet: no swap since
    assert calls == [(calls[0][0], True, 5, True)] and calls[0][0] != threading.get_ident()
    cache.swap([], [])
    assert cache._mapped is view and cache.copy_mode == "mapped" and len(calls) == 1
    pinning.close()   # "unregisters" its chunks while _unregister is stood in for (on a GPU the real
    # one, from the finalizer after the test, leaves a CUDA error the next test's first call reports)

    def failing(raw, **_):
        raise RuntimeError("a block copied through the mapped view came back different")

    monkeypatch.setattr(host_kv_cache, "_map_pool", failing)
    other = HostKVCache(torch.zeros(4, 6, B, 2, 3), 5)
    _as_on_cuda(monkeypatch, other)
    other.start_pinning()
    pinning = other._pinning
    assert not other.wait_pinned() and other.copy_mode == "staged"
    pinning.close()


def test_staged_swaps_wait_while_the_check_holds_the_pool(monkeypatch):
    """Until the mapped view is adopted, a swap (staged copies into the pool) takes the pool
    lock: while the pinning thread's check has its pattern in pool blocks, the swap waits, and
    its copy lands after the check restored them."""
    import threading

    import pagedserve.worker.host_kv_cache as host_kv_cache
    holding, release = threading.Event(), threading.Event()

    def check(raw, *, host, device, num_blocks, lock):
        with lock:
            saved = host[:, 2].clone()
            host[:, 2] = -1.0   # the pattern
            holding.set()
            release.wait(10)
            host[:, 2] = saved
        raise RuntimeError("no mapped view on the CPU")

    monkeypatch.setattr(host_kv_cache, "_map_pool", check)
    device = torch.randn(4, 6, B, 2, 3)
    cache = HostKVCache(device, 5)
    _as_on_cuda(monkeypatch, cache)
    cache.start_pinning()
    pinning = cache._pinning
    assert holding.wait(10)
    swapped = threading.Event()
    worker = threading.Thread(target=lambda: (cache.swap([(1, 2)], []), swapped.set()))
    worker.start()
    assert not swapped.wait(0.3)   # the check holds the pool
    release.set()
    assert swapped.wait(10)
    worker.join()
    assert torch.equal(cache.host[:, 2], device[:, 1])   # the swap's copy, not the restored contents
    pinning.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the mapped view needs CUDA")
def test_the_pinned_pool_is_mapped_and_swaps_through_it_exactly():
    """On CUDA: the pool pinned, its view checked in the background and adopted; blocks go out
    to the host and back bit for bit through the mapped copies."""
    device = torch.randn(6, 9, B, 2, 16, device="cuda")
    before = device.clone()
    cache = HostKVCache(device, 7)
    assert cache.wait_pinned() and cache.copy_mode == "mapped"
    cache.swap([(1, 6), (4, 0)], [])
    torch.cuda.synchronize()
    assert torch.equal(cache.host[:, 6], before[:, 1].cpu()) and torch.equal(cache.host[:, 0], before[:, 4].cpu())
    cache.swap([], [(6, 7), (0, 8)])
    cache.await_loads()
    torch.cuda.synchronize()
    assert torch.equal(device[:, 7], before[:, 1]) and torch.equal(device[:, 8], before[:, 4])


@pytest.mark.parametrize("n", [1, 2, 3, 19])
def test_copy_ids_rows_start_16_bytes_aligned(n):
    """The copy kernel's source and destination id rows both start 16-byte aligned whatever the
    pair count (Triton specialises pointers on it: an odd count compiled a second kernel)."""
    from pagedserve.worker.host_kv_cache import pair_ids
    pairs = [(i, 100 + i) for i in range(n)]
    ids = pair_ids(pairs)
    assert ids[0, :n].tolist() == list(range(n)) and ids[1, :n].tolist() == [100 + i for i in range(n)]
    assert ids.shape == (2, n + n % 2)
    assert ids[0].data_ptr() % 16 == 0 and ids[1].data_ptr() % 16 == 0 and ids[1, :n].stride(0) == 1
