"""All-reduce of small tensors over NVLink peer memory, through torch's symmetric memory
(`torch.distributed._symmetric_memory`, the CUDA backend: IPC-mapped peer buffers and signal
pads, no NVLink multicast). Decode all-reduces are small (llama-8b: rows x 4096 bf16, 8 KB at
one row) and latency-bound; NCCL's all-reduce costs ~15-25 us each there, a one-shot kernel that
writes this rank's partial sums into its symmetric buffer, waits on the peers' signals and sums
every peer's buffer costs ~5 us, and is captured inside the decode CUDA graphs like any kernel.

One op per all-reduce: `symm_mem.one_shot_all_reduce_copy_out(buffer, x, "sum", group, out)`
(copy-in, barrier, reduce, barrier in one kernel; a misaligned x is copied into the buffer
first). One-shot only, up to the buffer's size (ParallelConfig.custom_all_reduce_bytes, 1 MiB:
llama-8b decode steps of up to 128 rows): its kernel runs on at most 24 blocks, so for large
tensors NCCL's bandwidth wins (benchmarks/tp_gpu.py allreduce measures the crossover). The
choice depends only on dtype, size and contiguity, the same on every rank. Anything else (fp16,
larger tensors) goes to NCCL, and so does everything when set-up finds no support: every rank
must agree, so `init_symm_mem_all_reduce` decides collectively.

kind "push" (ParallelConfig.custom_all_reduce_kind; the default at TP=2, up to 4 MiB):
layers/triton_all_reduce.py's kernel instead, one one-way signal per all-reduce where the
one-shot op waits for two round trips (H200 pair: b1_decode 312 -> 330 tok/s, thr512 +1.6%,
the same tokens); more than two ranks keep the one-shot op.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from pagedserve.layers.parallel import CustomAllReduce

logger = logging.getLogger(__name__)

DTYPES = (torch.bfloat16, torch.float32)   # what the symm_mem kernels dispatch on


class SymmMemAllReduce:
    """Sum of a tensor across the default group's ranks through a symmetric buffer. `__call__`
    returns a new tensor (the input is left as it was); safe inside CUDA graph capture. One
    all-reduce at a time, in stream order (each op ends with a barrier, so the next may reuse
    the buffer)."""

    def __init__(self, buffer: torch.Tensor, group_name: str) -> None:
        self.buffer, self.group_name = buffer, group_name
        self.max_bytes = buffer.numel() * buffer.element_size()
        # copy-in inside the kernel (torch >= 2.8); without it, a copy into the buffer first
        self._copy_out = getattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out", None)

    def can_reduce(self, tensor: torch.Tensor) -> bool:
        """The same answer on every rank for the same shape and dtype (no pointer in it)."""
        nbytes = tensor.numel() * tensor.element_size()
        return (tensor.dtype in DTYPES and tensor.is_cuda and tensor.is_contiguous() and 0 < nbytes <= self.max_bytes
                and nbytes % 16 == 0)

    def probe_ok(self) -> bool:
        """After the start-up probe: torch's op raises where a peer fails, so a probe that
        returned completed."""
        return True

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        staged = self.buffer.view(tensor.dtype)[:tensor.numel()].view(tensor.shape)
        out = torch.empty_like(tensor)
        if self._copy_out is not None and tensor.data_ptr() % 16 == 0:   # same alignment as the buffer
            return self._copy_out(staged, tensor, "sum", self.group_name, out)
        staged.copy_(tensor)
        return torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, out)


def local_support(device: torch.device, world_size: int) -> str | None:
    """Why this rank cannot use symmetric memory (None: it can, as far as it can tell alone)."""
    if device.type != "cuda":
        return "not a CUDA device"
    if world_size < 2:
        return "one rank"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
        _ = torch.ops.symm_mem.one_shot_all_reduce_out   # AttributeError where torch lacks it
    except (ImportError, AttributeError, RuntimeError) as exc:
        return f"torch has no symmetric-memory all-reduce ({exc})"
    index = device.index if device.index is not None else torch.cuda.current_device()
    for peer in range(min(torch.cuda.device_count(), world_size)):
        if peer != index and not torch.cuda.can_device_access_peer(index, peer):
            return f"GPU {index} has no peer access to GPU {peer}"
    return None


def _prefer_cuda_backend(symm_mem, device: torch.device) -> None:
    """Peer memory over CUDA IPC (the backend the one-shot kernel was written for), unless this
    process already allocated symmetric memory; a torch without backends has only that one."""
    try:
        if symm_mem.get_backend(device) is None:
            symm_mem.set_backend("CUDA")
    except (AttributeError, RuntimeError) as exc:
        logger.debug("symmetric memory backend left as it is: %s", exc)


def _all_agree(ok: bool, device: torch.device) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _one_shot_reducer(symm_mem, device: torch.device, buffer_bytes: int, group_name: str) -> SymmMemAllReduce:
    buffer = symm_mem.empty(buffer_bytes, dtype=torch.uint8, device=device)
    if symm_mem.rendezvous(buffer, group_name) is None:
        raise RuntimeError("rendezvous returned no handle")
    return SymmMemAllReduce(buffer, group_name)


def _push_reducer(symm_mem, device: torch.device, buffer_bytes: int, group_name: str):
    """Two slots of `buffer_bytes` and the flags in one symmetric buffer per rank; this rank
    writes into the peer's (layers/triton_all_reduce.py). Its spins are bounded to a few
    seconds until it passes the probe (each rank compiles the kernel first)."""
    from pagedserve.layers.triton_all_reduce import MAX_PROGRAMS, PushBuffers
    data = 2 * buffer_bytes
    buffer = symm_mem.empty(data + 8 * MAX_PROGRAMS, dtype=torch.uint8, device=device)
    buffer.zero_()
    torch.cuda.synchronize(device)   # zeroed before the peer can write its first flag
    handle = symm_mem.rendezvous(buffer, group_name)
    if handle is None:
        raise RuntimeError("rendezvous returned no handle")
    peer = 1 - dist.get_rank()
    flags = data // 8
    return PushBuffers(handle.get_buffer(peer, (data,), torch.uint8, 0), buffer[:data],
                       handle.get_buffer(peer, (MAX_PROGRAMS,), torch.int64, flags),
                       buffer.view(torch.int64)[flags:flags + MAX_PROGRAMS], max_spins=1 << 24)


def init_symm_mem_all_reduce(device: torch.device, buffer_bytes: int, kind: str = "one_shot"
                             ) -> CustomAllReduce | None:
    """Collective (every rank of the default group calls it): allocate and exchange the
    symmetric buffer, then check one all-reduce against NCCL. Returns None on every rank
    (NCCL for everything) if any rank lacks support, fails to set up, or gets a wrong sum.
    `kind`: "one_shot" (torch's op) or "push" (two ranks only; else one_shot)."""
    world = dist.get_world_size()
    why = local_support(device, world)
    if not _all_agree(why is None, device):
        logger.info("custom all-reduce off: %s", why or "another rank lacks support")
        return None
    kind = kind if world == 2 else "one_shot"
    reducer, error = None, None
    try:
        import torch.distributed._symmetric_memory as symm_mem
        _prefer_cuda_backend(symm_mem, device)
        make = _push_reducer if kind == "push" else _one_shot_reducer
        reducer = make(symm_mem, device, buffer_bytes, dist.group.WORLD.group_name)
        probe = torch.arange(4096, dtype=torch.float32, device=device) * (dist.get_rank() + 1)
        expected = torch.arange(4096, dtype=torch.float32, device=device) * (world * (world + 1) // 2)
        if not torch.equal(reducer(probe), expected) or not reducer.probe_ok():
            raise RuntimeError("the symmetric-memory probe gave a wrong sum or gave up waiting")
    except Exception as exc:   # any failure: every rank falls back to NCCL together
        error, reducer = exc, None
    if not _all_agree(reducer is not None, device):
        logger.warning("custom all-reduce off: %s", error or "set-up failed on another rank")
        return None
    logger.info("custom all-reduce: symmetric memory %s up to %d KiB", kind, buffer_bytes >> 10)
    return reducer
