"""The host tier's memory and the copies between it and the device KV cache.

Layout: the runner's device cache is one tensor [2 * num_layers, num_blocks, block_size,
num_kv_heads, head_dim] (plane 2l is layer l's K, 2l + 1 its V); the host pool has the same
layout with its own block count. On CPU both are plain tensors and a swap is two indexing
ops. On CUDA the host pool is page-locked with cudaHostRegister (exact size: torch's pinned
allocator rounds up to a power of two) and mapped into the device's address space, so one
Triton kernel per direction (attention/triton_copy_blocks.py) copies every block of the step
over all layers: no per-block or per-layer launch, no staging buffer, no host sync.

Pinning a large pool takes tens of seconds (4 GiB ~3 s on the H200 with _Pinning's pauses), so
it runs in a background thread, in chunks (several registrations of one contiguous range; the
mapping is per page): start-up is not blocked, and until the whole pool is pinned, copies go
through the staged path below. The runner starts it at the end of start-up (after the CUDA graph
capture: a capture in global mode forbids other threads' cudaHostRegister), while the engine is
idle: while a registration runs, the engine thread's CUDA calls (graph launches, copies) wait (on
the H200 a 0.25 s batch-1 decode of llama-1b took 1.7 s while 4 GiB were pinned the old way; 5-10%
slower with _Pinning's pauses), and under load a registration stalled a step 75-120 ms on an H100
host. Started at the first swap instead (before session 38), the pinning and the staged copies
met a busy engine: ttft1024 after thr512 113-280 ms against 23-28 ms pinned at start-up
(benchmarks/RESULTS.md, issue 22, session 38). The pinning thread then makes the mapped view and
checks it with a round trip through the kernel (the pool's first, last and chunk-edge blocks to
a scratch device tensor and back; a lock keeps the engine's staged copies out of those blocks
meanwhile); the engine thread adopts the view at its first swap after that, waiting for nothing.

Ordering (the SchedulerOutput's lists, see engine_io): on CUDA the copies run on their own
stream, which first waits for the work already queued on the compute stream (the previous
forward wrote the blocks a swap-out reads, and may still write blocks the scheduler has since
freed). Swap-outs run first; the step's forward waits for them (the scheduler hands their
source blocks out again in the same step). Swap-ins run next, overlapping the step's forward:
the scheduler runs no request of the step on blocks it loads (KVCacheManager.is_loading), and
the next step's forward waits for them (`await_loads`). Write-behind swap-outs (the list's
last `num_swap_out_behind`: free device blocks next in line for eviction) run last, also
overlapping the forward (it cannot write them), and the next forward waits for them too.

If the pool cannot be registered, or the mapped view cannot be made or fails its check,
copies go through device staging tensors and synchronous transfers instead (slower, same
results), with a warning.
"""
from __future__ import annotations

import functools
import logging
import mmap
import threading
import time
import weakref
from typing import Callable

import torch

from pagedserve.engine_io import BlockId

logger = logging.getLogger(__name__)

_CUDA_HOST_REGISTER_PORTABLE_MAPPED = 0x01 | 0x02
_STAGED_CHUNK_BYTES = 256 * 2**20   # bound on the fallback's device staging tensor
_PIN_CHUNK_BYTES = 32 * 2**20       # one cudaHostRegister call of the background pinning (_Pinning)
_PIN_PAUSE = 3.0                    # the pinning thread sleeps 3x each registration's time after it


def _words(cache: torch.Tensor) -> torch.Tensor:
    """[planes, blocks, ...] as [planes, blocks, words] of the widest integer that divides a
    block of one plane (the kernel moves raw bytes)."""
    raw = cache.view(cache.shape[0], cache.shape[1], -1).view(torch.uint8)
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if raw.shape[2] % size == 0:
            return raw.view(dtype)
    return raw


def pair_ids(pairs: list[tuple[BlockId, BlockId]]) -> torch.Tensor:
    """[2, n rounded up to even] int64: the pairs' sources, then their destinations, each row
    contiguous (a transpose of [n, 2] is not when n == 1: `contiguous()` keeps its strides,
    size-1 dims being exempt), padded with zeros so the second row starts 16 bytes aligned, as
    the first does. Triton specialises a pointer on 16-byte alignment: with odd counts the copy
    kernel had a second specialisation, compiled at the first odd swap (100 ms into ttft1024
    on a cold cache, an H100; benchmarks/RESULTS.md, issue 22, session 40)."""
    width = len(pairs) + len(pairs) % 2
    pad = [0] * (width - len(pairs))
    return torch.tensor([s for s, _ in pairs] + pad + [d for _, d in pairs] + pad, dtype=torch.int64).view(2, width)


class _CudaArray:
    """__cuda_array_interface__ over registered host memory: torch.as_tensor makes a CUDA
    tensor of it (kernels reach the pages through the mapping). Holds the host tensor."""

    def __init__(self, host: torch.Tensor) -> None:
        self.host = host
        self.__cuda_array_interface__ = {"shape": tuple(host.shape), "typestr": "|u1",
                                         "data": (host.data_ptr(), False), "version": 3, "strides": None}


def _register(pointer: int, nbytes: int) -> None:
    error = torch.cuda.cudart().cudaHostRegister(pointer, nbytes, _CUDA_HOST_REGISTER_PORTABLE_MAPPED)
    code = int(getattr(error, "value", error))
    if code != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.1f} GiB failed (CUDA error {code})")


def _unregister(pointer: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(pointer)
    except Exception:   # interpreter shutdown
        pass


def pin_chunks(pointer: int, nbytes: int, chunk: int | None = None) -> list[tuple[int, int]]:
    """[start, end) address ranges covering the pool, cut at multiples of `chunk` (default
    _PIN_CHUNK_BYTES), so two ranges never share a page."""
    chunk = chunk or _PIN_CHUNK_BYTES
    edges = list(range((pointer // chunk + 1) * chunk, pointer + nbytes, chunk))
    bounds = [pointer, *edges, pointer + nbytes]
    return list(zip(bounds[:-1], bounds[1:]))


def check_blocks(pointer: int, nbytes: int, planes: int, num_blocks: int, most: int = 32) -> list[int]:
    """The pool's blocks that the mapped view's check copies: the first, the last, and (up to
    `most` of) those with a plane that crosses a registered chunk's edge. The pool is
    [planes, num_blocks, block] at `pointer`, `nbytes` long."""
    plane_bytes = nbytes // planes
    edges = [(start - pointer) % plane_bytes * num_blocks // plane_bytes for start, _ in pin_chunks(pointer, nbytes)[1:]]
    return sorted({0, num_blocks - 1, *edges[::max(1, -(-len(edges) // most))]})


class _Pinning:
    """Registers the host tensor `raw` chunk by chunk in a daemon thread; `done` is set when it
    ends, `ok` tells whether every chunk was registered. close() stops it (between chunks) and
    unregisters what it registered; it holds no reference to the HostKVCache.

    While a cudaHostRegister runs, every other CUDA call of the process waits (a lock in the
    driver, by all appearances: on the H200 a graph replay with a sync waited 0.3-0.7 s at a time
    while 256 MiB chunks were registered back to back; benchmarks/RESULTS.md, issue 22, session
    17). So each chunk's pages are first touched here, outside the lock (the registration then
    only pins them: ~7x shorter), the chunks are small, and after each the thread sleeps `pause`
    times as long as the registration took, so the engine thread's calls get through between
    them. Then `check(raw)` (if given) makes and checks the mapped view in this thread too, off
    the engine's steps: its round trip through the copy kernel (a compile on a cold Triton
    cache) and the host pattern work took 19-342 ms of the first step that swapped when the
    engine thread ran it (ttft1024 after thr512 on an H100, warm / cold cache: 45.5 / 456.9 ms,
    24.1 / 24.5 ms now; benchmarks/RESULTS.md, issue 22, session 40)."""

    def __init__(self, raw: torch.Tensor, device: torch.device, chunk: int | None = None, touch: bool = True,
                 pause: float | None = None, check: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.pointer, self.nbytes, self.device = raw.data_ptr(), raw.numel() * raw.element_size(), device
        self.check = check
        self.mapped: torch.Tensor | None = None   # check(raw)'s result, once every chunk is registered
        self.chunk, self.touch = chunk or _PIN_CHUNK_BYTES, touch
        self.pause = _PIN_PAUSE if pause is None else pause
        self._raw: torch.Tensor | None = raw.view(torch.uint8).view(-1)   # until the thread ends
        self.chunks: list[int] = []
        self.ok = False
        self.error: Exception | None = None
        self.seconds = 0.0            # start to end
        self.register_seconds = 0.0   # of which in cudaHostRegister (the other threads' CUDA calls wait)
        self.stop, self.done = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="host-kv-pinning", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        began = time.monotonic()
        try:   # inference mode: the runner starts this at a step's first swap, under its inference mode, where
            # the byte view self._raw became an inference tensor, writable only under the mode (per thread)
            torch.cuda.set_device(self.device)
            with torch.inference_mode():
                self.ok = self._pin_all()
                if self.ok and self.check is not None:
                    self.mapped = self.check(self._raw)
        except Exception as exc:   # pageable memory still works, through staged copies
            self.error = exc
        finally:
            self._raw = self.check = None
            self.seconds = time.monotonic() - began
            self.done.set()

    def _pin_all(self) -> bool:
        """Touch and register every chunk; False if close() stopped it first."""
        for start, end in pin_chunks(self.pointer, self.nbytes, self.chunk):
            if self.stop.is_set():
                return False
            if self.touch:   # one byte a page faults it in (the pool is never read before written)
                self._raw[start - self.pointer:end - self.pointer:mmap.PAGESIZE].zero_()
            t0 = time.monotonic()
            _register(start, end - start)
            took = time.monotonic() - t0
            self.register_seconds += took
            self.chunks.append(start)
            if self.pause:
                self.stop.wait(self.pause * took)
        return True

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for pointer in self.chunks:
            _unregister(pointer)
        self.chunks = []


def _map_pool(raw: torch.Tensor, *, host: torch.Tensor, device: torch.device, num_blocks: int,
              lock: threading.Lock) -> torch.Tensor:
    """The registered pool `raw` (bytes of `host`, [planes, num_blocks, ...]) as a CUDA view of
    words, after a round trip through the copy kernel: the first, last and chunk-edge blocks to
    a scratch device tensor and back, on a stream of its own. Runs in the pinning thread; holds
    `lock` while the pattern is in those blocks (their contents are restored). Raises if the
    view cannot be made or a block comes back different."""
    from pagedserve.attention.triton_copy_blocks import copy_blocks
    view = torch.as_tensor(_CudaArray(raw), device=device)
    mapped = _words(view.view(host.dtype).view(host.shape))
    host_words = _words(host)
    planes, words = mapped.shape[0], mapped.shape[2]
    ends = check_blocks(raw.data_ptr(), raw.numel(), planes, num_blocks)
    n = len(ends)
    pattern = torch.arange(planes * n * words, dtype=torch.int64).to(mapped.dtype).view(planes, n, words)
    scratch = torch.zeros(planes, n, words, dtype=mapped.dtype, device=device)
    src = torch.tensor(ends, dtype=torch.int64, device=device)
    dst = torch.arange(n, dtype=torch.int64, device=device)
    stream = torch.cuda.Stream(device)
    with lock:
        saved = host_words[:, ends].clone()   # they may hold swapped-out blocks
        try:
            host_words[:, ends] = pattern
            with torch.cuda.stream(stream):
                copy_blocks(mapped, scratch, src, dst)                            # host -> device
                stream.synchronize()
                ok = torch.equal(scratch.cpu(), pattern)
                scratch.zero_()
                copy_blocks(scratch, mapped, dst, src)                            # device -> host
                stream.synchronize()
            ok = ok and not host_words[:, ends].any()
        finally:
            host_words[:, ends] = saved
    if not ok:
        raise RuntimeError("a block copied through the mapped view came back different")
    return mapped


class HostKVCache:
    """`num_blocks` host blocks shaped like `device_cache`'s. `swap()` is called by the runner
    once per step that carries copies."""

    def __init__(self, device_cache: torch.Tensor, num_blocks: int) -> None:
        self.device_cache = device_cache
        self.device = device_cache.device
        self.num_blocks = num_blocks
        shape = (device_cache.shape[0], num_blocks, *device_cache.shape[2:])
        numel = 1
        for size in shape:
            numel *= size
        # bytes, so the registered range is exactly the pool; never read before written
        raw = torch.empty(numel * device_cache.element_size(), dtype=torch.uint8)
        self.host = raw.view(device_cache.dtype).view(shape)
        self.stream: torch.cuda.Stream | None = None
        self._mapped: torch.Tensor | None = None   # CUDA view of `host` (words)
        self._loads: torch.cuda.Event | None = None   # after the last swap-ins, not yet awaited
        self._raw = raw
        self._pinning: _Pinning | None = None   # until the mapped view is adopted (or refused)
        self._pin_started = False
        # held by swap(), and by the pinning thread's check while it writes its pattern into pool
        # blocks: the staged copies never meet it
        self._pool_lock = threading.Lock()
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
        self._device_words = _words(device_cache)
        self._host_words = _words(self.host)

    @property
    def mapped(self) -> bool:
        return self._mapped is not None

    @property
    def copy_mode(self) -> str:
        """How copies run now: "cpu" (two tensors), "mapped", "staged", or staged until the
        background pinning ends."""
        if self.stream is None:
            return "cpu"
        if not self._pin_started or (self._pinning is not None and not self._pinning.done.is_set()):
            return "staged until pinned (in the background, from the end of start-up)"
        return "mapped" if self._mapped is not None else "staged"

    def start_pinning(self) -> None:
        """Begin the background pinning now (the runner: at the end of start-up, while idle)."""
        if self.stream is not None and not self._pin_started:
            self._start_pinning()

    def _start_pinning(self) -> None:
        self._pin_started = True
        self._pinning = _Pinning(self._raw, self.device, check=functools.partial(
            _map_pool, host=self.host, device=self.device, num_blocks=self.num_blocks, lock=self._pool_lock))
        weakref.finalize(self, self._pinning.close)

    def wait_pinned(self) -> bool:
        """Block until the background pinning ends (starting it if no step did) and adopt the
        mapped view; True if mapped (benchmarks and checks; the engine never waits)."""
        self.start_pinning()
        if self._pinning is not None:
            self._pinning.done.wait()
            self._adopt()
        return self.mapped

    def _adopt(self) -> None:
        """The pinning thread ended: adopt the mapped view it made and checked (engine thread,
        between steps: nothing here waits)."""
        pinning, self._pinning = self._pinning, None
        if not pinning.ok or pinning.mapped is None:
            logger.warning("host KV tier: %s; swaps use staged copies from pageable memory",
                           pinning.error or "the pinning was stopped")
            return
        self._mapped, pinning.mapped = pinning.mapped, None
        logger.info("host KV tier: %.1f GiB pinned and its mapped view checked in the background in %.1f s "
                    "(%.2f s of it registering); copies mapped", pinning.nbytes / 2**30, pinning.seconds,
                    pinning.register_seconds)

    def await_loads(self) -> None:
        """Before a forward: the compute stream waits for the last step's swap-ins and
        write-behind swap-outs."""
        if self._loads is not None:
            torch.cuda.current_stream(self.device).wait_event(self._loads)
            self._loads = None

    def swap(self, swap_out: list[tuple[BlockId, BlockId]], swap_in: list[tuple[BlockId, BlockId]],
             num_behind: int = 0) -> None:
        """Copy device -> host for each (device, host) pair of `swap_out` but its last
        `num_behind` (write-behind), then host -> device for each (host, device) pair of
        `swap_in`, then the write-behind pairs, ordered with the compute stream (module
        docstring): the step's forward waits for the first group only, the next step's for
        all. Mutates the host pool and the device cache."""
        swap_out, behind = swap_out[:len(swap_out) - num_behind], swap_out[len(swap_out) - num_behind:]
        if self.stream is None:
            self._copy(self._device_words, self._host_words, swap_out)
            self._copy(self._host_words, self._device_words, swap_in)
            self._copy(self._device_words, self._host_words, behind)
            return
        if not self._pin_started:
            self._start_pinning()
        elif self._pinning is not None and self._pinning.done.is_set():
            self._adopt()
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)
        mapped = self._mapped is not None
        copy = self._copy if mapped else self._staged
        host = self._mapped if mapped else self._host_words
        # the pinning thread's check may have its pattern in pool blocks until the view is adopted
        with self._pool_lock, torch.cuda.stream(self.stream):
            if swap_out:
                copy(self._device_words, host, swap_out)
                compute.wait_stream(self.stream)   # the forward may overwrite their sources
            if swap_in:
                copy(host, self._device_words, swap_in)
            if behind:
                copy(self._device_words, host, behind)
            if swap_in or behind:   # the next step's forward waits for these
                self._loads = torch.cuda.Event()
                self._loads.record(self.stream)

    def _copy(self, src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[BlockId, BlockId]]) -> None:
        if not pairs:
            return
        ids = pair_ids(pairs)
        if src.device.type == "cuda":
            from pagedserve.attention.triton_copy_blocks import copy_blocks
            ids = ids.pin_memory().to(self.device, non_blocking=True)
            copy_blocks(src, dst, ids[0, :len(pairs)], ids[1, :len(pairs)])
        else:
            dst[:, ids[1, :len(pairs)]] = src[:, ids[0, :len(pairs)]]

    def _staged(self, src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[BlockId, BlockId]]) -> None:
        """Fallback: gather, transfer, scatter, in chunks (device memory stays bounded)."""
        block_bytes = src.shape[0] * src.shape[2] * src.element_size()
        step = max(1, _STAGED_CHUNK_BYTES // block_bytes)
        for start in range(0, len(pairs), step):
            ids = torch.tensor(pairs[start:start + step], dtype=torch.int64).t()
            dst[:, ids[1].to(dst.device)] = src[:, ids[0].to(src.device)].to(dst.device)
