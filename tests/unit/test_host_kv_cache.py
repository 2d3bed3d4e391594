"""The host tier's memory and copies (worker/host_kv_cache.py): the block copies both ways and
their order (CPU: both pools are plain tensors), the staged fallback, the background pinning of
the pool and the check of its mapped view, the copy kernel's id rows; on CUDA, the mapped copies.
The scheduler's side (which blocks go where): test_kv_offload.py."""
from __future__ import annotations

import time

import pytest
import torch

from pagedserve.worker.host_kv_cache import HostKVCache, check_blocks, pin_chunks

B = 4


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


def test_the_host_pool_is_pinned_from_start_up_or_the_first_swap_not_a_step(monkeypatch):
    """On CUDA the pool's pinning (which stalls every other CUDA call while a chunk registers)
    starts when the runner's start-up ends (start_pinning), or at the first swap if nothing
    started it: the per-step await_loads does not; starting twice starts once. The CUDA stream
    calls are stood in for (no copies: empty lists)."""
    cache = HostKVCache(torch.zeros(4, 6, B, 2, 3), 5)
    started = []
    monkeypatch.setattr(cache, "_start_pinning", lambda: started.append(True))
    _as_on_cuda(monkeypatch, cache)
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
    """A swap takes the pool lock: while the pinning thread's check has its pattern in pool blocks,
    the swap (staged copies into the pool, the view not adopted yet) waits, and its copy lands
    after the check restored them."""
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
