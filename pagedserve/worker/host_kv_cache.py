"""The host tier's memory and the copies between it and the device KV cache.

Layout: the runner's device cache is one tensor [2 * num_layers, num_blocks, block_size,
num_kv_heads, head_dim] (plane 2l is layer l's K, 2l + 1 its V); the host pool has the same
layout with its own block count. On CPU both are plain tensors and a swap is two indexing
ops. On CUDA the host pool is page-locked with cudaHostRegister (exact size: torch's pinned
allocator rounds up to a power of two) and mapped into the device's address space, so one
Triton kernel per direction (attention/triton_copy_blocks.py) copies every block of the step
over all layers: no per-block or per-layer launch, no staging buffer, no host sync.

Ordering (the SchedulerOutput's lists, see engine_io): on CUDA the copies run on their own
stream, which first waits for the work already queued on the compute stream (the previous
forward wrote the blocks a swap-out reads, and may still write blocks the scheduler has since
freed). Swap-outs run first; the step's forward waits for them (the scheduler hands their
source blocks out again in the same step). Swap-ins run next, overlapping the step's forward:
the scheduler runs no request of the step on blocks it loads (KVCacheManager.is_loading), and
the next step's forward waits for them (`await_loads`).

If the pool cannot be registered, or the mapped view cannot be made or fails its start-up
check, copies go through device staging tensors and synchronous transfers instead (slower,
same results), with a warning.
"""
from __future__ import annotations

import logging
import weakref

import torch

from pagedserve.engine_io import BlockId

logger = logging.getLogger(__name__)

_CUDA_HOST_REGISTER_PORTABLE_MAPPED = 0x01 | 0x02
_STAGED_CHUNK_BYTES = 256 * 2**20   # bound on the fallback's device staging tensor


def _words(cache: torch.Tensor) -> torch.Tensor:
    """[planes, blocks, ...] as [planes, blocks, words] of the widest integer that divides a
    block of one plane (the kernel moves raw bytes)."""
    raw = cache.view(cache.shape[0], cache.shape[1], -1).view(torch.uint8)
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if raw.shape[2] % size == 0:
            return raw.view(dtype)
    return raw


class _CudaArray:
    """__cuda_array_interface__ over registered host memory: torch.as_tensor makes a CUDA
    tensor of it (kernels reach the pages through the mapping). Holds the host tensor."""

    def __init__(self, host: torch.Tensor) -> None:
        self.host = host
        self.__cuda_array_interface__ = {"shape": tuple(host.shape), "typestr": "|u1",
                                         "data": (host.data_ptr(), False), "version": 3, "strides": None}


def _register(host: torch.Tensor) -> None:
    error = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel() * host.element_size(),
                                                 _CUDA_HOST_REGISTER_PORTABLE_MAPPED)
    code = int(getattr(error, "value", error))
    if code != 0:
        raise RuntimeError(f"cudaHostRegister of {host.numel() * host.element_size() / 2**30:.1f} GiB failed "
                           f"(CUDA error {code})")


def _unregister(pointer: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(pointer)
    except Exception:   # interpreter shutdown
        pass


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
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
            try:
                _register(raw)
            except Exception as exc:   # pageable memory still works, through staged copies
                logger.warning("host KV tier: %s; swaps use staged copies from pageable memory", exc)
            else:
                weakref.finalize(self, _unregister, raw.data_ptr())
                self._mapped = self._map(raw)
        self._device_words = _words(device_cache)
        self._host_words = _words(self.host)

    @property
    def mapped(self) -> bool:
        return self._mapped is not None

    def _map(self, raw: torch.Tensor) -> torch.Tensor | None:
        """The mapped view as words, after a round trip through the kernel; None (with a
        warning) if that fails."""
        try:
            from pagedserve.attention.triton_copy_blocks import copy_blocks
            view = torch.as_tensor(_CudaArray(raw), device=self.device)
            mapped = _words(view.view(self.device_cache.dtype).view(self.host.shape))
            device_words = _words(self.device_cache)
            pattern = torch.arange(mapped.shape[0] * mapped.shape[2], dtype=torch.int64)
            pattern = pattern.to(mapped.dtype).view(mapped.shape[0], mapped.shape[2])
            saved = device_words[:, 0].clone()
            ids = torch.zeros(1, dtype=torch.int64, device=self.device)
            _words(self.host)[:, 0] = pattern
            copy_blocks(mapped, device_words, ids, ids)                           # host -> device
            ok = torch.equal(device_words[:, 0].cpu(), pattern)
            device_words[:, 0] = 0
            copy_blocks(device_words, mapped, ids, ids)                           # device -> host
            torch.cuda.synchronize(self.device)
            ok = ok and not _words(self.host)[:, 0].any()
            device_words[:, 0] = saved
            if not ok:
                raise RuntimeError("a block copied through the mapped view came back different")
            return mapped
        except Exception as exc:
            logger.warning("host KV tier: no mapped view of the pinned pool (%s); swaps use staged copies", exc)
            return None

    def await_loads(self) -> None:
        """Before a forward: the compute stream waits for the last step's swap-ins."""
        if self._loads is not None:
            torch.cuda.current_stream(self.device).wait_event(self._loads)
            self._loads = None

    def swap(self, swap_out: list[tuple[BlockId, BlockId]], swap_in: list[tuple[BlockId, BlockId]]) -> None:
        """Copy device -> host for each (device, host) pair of `swap_out`, then host -> device
        for each (host, device) pair of `swap_in`, ordered with the compute stream (module
        docstring). Mutates the host pool and the device cache."""
        if self.stream is None:
            self._copy(self._device_words, self._host_words, swap_out)
            self._copy(self._host_words, self._device_words, swap_in)
            return
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)
        mapped = self._mapped is not None
        copy = self._copy if mapped else self._staged
        host = self._mapped if mapped else self._host_words
        with torch.cuda.stream(self.stream):
            if swap_out:
                copy(self._device_words, host, swap_out)
                compute.wait_stream(self.stream)   # the forward may overwrite their sources
            if swap_in:
                copy(host, self._device_words, swap_in)
                self._loads = torch.cuda.Event()
                self._loads.record(self.stream)

    def _copy(self, src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[BlockId, BlockId]]) -> None:
        if not pairs:
            return
        # [2, n]: sources then destinations, each row contiguous (a transpose of [n, 2] is not
        # when n == 1: `contiguous()` keeps its strides, size-1 dims being exempt)
        ids = torch.tensor([s for s, _ in pairs] + [d for _, d in pairs], dtype=torch.int64).view(2, -1)
        if src.device.type == "cuda":
            from pagedserve.attention.triton_copy_blocks import copy_blocks
            ids = ids.pin_memory().to(self.device, non_blocking=True)
            copy_blocks(src, dst, ids[0], ids[1])
        else:
            dst[:, ids[1]] = src[:, ids[0]]

    def _staged(self, src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[BlockId, BlockId]]) -> None:
        """Fallback: gather, transfer, scatter, in chunks (device memory stays bounded)."""
        block_bytes = src.shape[0] * src.shape[2] * src.element_size()
        step = max(1, _STAGED_CHUNK_BYTES // block_bytes)
        for start in range(0, len(pairs), step):
            ids = torch.tensor(pairs[start:start + step], dtype=torch.int64).t()
            dst[:, ids[1].to(dst.device)] = src[:, ids[0].to(src.device)].to(dst.device)
