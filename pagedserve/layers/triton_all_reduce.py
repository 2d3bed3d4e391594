"""All-reduce of small tensors between two GPUs of one machine in one Triton kernel with one
one-way signal ("push"), over torch's symmetric memory (IPC-mapped peer buffers, no NVLink
multicast). torch's one-shot all-reduce (layers/custom_all_reduce.py) synchronises twice per
call: a barrier before it reads the peer's buffer (pull) and one after, so the peer does not
overwrite that buffer while it is read; each costs an NVLink round trip (~6.7 us per
all-reduce of one llama-8b row in a CUDA graph on an H200 pair, 65 per decode step).

Here each rank writes its tensor straight into the peer's receive buffer, then raises a flag
there; it waits only for the peer's flag on its own memory and sums from local memory. The
receive buffer has two slots, used in turn by a per-program epoch counter (device memory, so
CUDA graph replays advance it): a rank writes slot e % 2 for epoch e + 2 only after it saw the
peer's flag of epoch e + 1, which the peer raises in a later kernel than the one that read
slot e % 2 (stream order), so no second barrier is needed.

    program p, epoch e = epochs[p] + 1:
      peer.recv[e % 2][chunk p] = x[chunk p]           (remote stores)
      bar.sync; peer.flags[p] = e                       (release, system scope)
      spin until my.flags[p] >= e                       (acquire, system scope)
      out[chunk p] = x[chunk p] + my.recv[e % 2][chunk p]   (fp32 sum, rounded once)
      epochs[p] = e

Both ranks must launch the same kernels in the same order with the same grid (the grid
depends only on the size), as they do: the same model code on the same steps. The sum of two
values is commutative, so both ranks get the same bits, equal to NCCL's. A spin that outlasts
`max_spins` sets `error` and gives up: in service that is ~an hour (a peer that slow is dead);
the start-up probe waits seconds (layers/custom_all_reduce.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024        # elements per program and iteration (as measured, benchmarks/RESULTS.md)
NUM_WARPS = 4
MAX_PROGRAMS = 64   # programs of the largest call (all resident: each waits on one peer program)


@triton.jit
def _push_all_reduce_kernel(x_ptr, out_ptr, send_ptr, recv_ptr, send_flags_ptr, recv_flags_ptr, epochs_ptr, error_ptr,
                            numel, chunk, slot_elems, max_spins, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    epoch = tl.load(epochs_ptr + pid) + 1
    slot = (epoch % 2) * slot_elems
    start = pid * chunk
    end = tl.minimum(start + chunk, numel)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        tl.store(send_ptr + slot + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
    tl.debug_barrier()   # every thread's stores before the flag (the release is cumulative)
    tl.atomic_xchg(send_flags_ptr + pid, epoch, sem="release", scope="sys")
    seen = tl.atomic_add(recv_flags_ptr + pid, 0, sem="acquire", scope="sys")
    spins = 0
    while (seen < epoch) & (spins < max_spins):
        seen = tl.atomic_add(recv_flags_ptr + pid, 0, sem="acquire", scope="sys")
        spins += 1
    tl.store(error_ptr + pid, 1, mask=seen < epoch)
    tl.debug_barrier()
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        mine = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        theirs = tl.load(recv_ptr + slot + offs, mask=mask, other=0.0, cache_modifier=".cv").to(tl.float32)
        tl.store(out_ptr + offs, (mine + theirs).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(epochs_ptr + pid, epoch)


def grid_for(numel: int) -> tuple[int, int]:
    """(programs, elements per program) for a tensor of `numel` elements: the same on every rank."""
    chunk = triton.cdiv(triton.cdiv(numel, min(triton.cdiv(numel, BLOCK), MAX_PROGRAMS)), BLOCK) * BLOCK
    return triton.cdiv(numel, chunk), chunk


class PushBuffers:
    """One rank's view of the pair's buffers: its own receive slots and flags (`recv`,
    `recv_flags`, in its memory) and the peer's (`send`, `send_flags`, mapped from the peer's
    memory), as bytes / int64; plus its own epoch counters and error flags."""

    MAX_SPINS = (1 << 31) - 1

    def __init__(self, send: torch.Tensor, recv: torch.Tensor, send_flags: torch.Tensor, recv_flags: torch.Tensor,
                 max_spins: int = MAX_SPINS) -> None:
        if send.dtype != torch.uint8 or recv.shape != send.shape or send.numel() % 32:
            raise ValueError("push all-reduce: send and recv must be byte buffers of one size, two slots")
        if not (send_flags.dtype == recv_flags.dtype == torch.int64 and recv_flags.numel() >= MAX_PROGRAMS):
            raise ValueError(f"push all-reduce: flags must be int64, at least {MAX_PROGRAMS}")
        self.send, self.recv, self.send_flags, self.recv_flags = send, recv, send_flags, recv_flags
        self.slot_bytes = send.numel() // 2
        self.epochs = torch.zeros(MAX_PROGRAMS, dtype=torch.int64, device=recv.device)
        self.error = torch.zeros(MAX_PROGRAMS, dtype=torch.int32, device=recv.device)
        self.max_spins = max_spins
        self._views: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}   # (send, recv) per dtype

    def can_reduce(self, tensor: torch.Tensor) -> bool:
        nbytes = tensor.numel() * tensor.element_size()
        return tensor.dtype in (torch.bfloat16, torch.float16, torch.float32) and tensor.is_contiguous() \
            and 0 < nbytes <= self.slot_bytes and tensor.device == self.recv.device

    def probe_ok(self) -> bool:
        """After the start-up probe: whether every spin saw the peer's flag; if so, spins
        from here on are bounded by MAX_SPINS (in service, ~an hour)."""
        if bool(self.error.any()):
            return False
        self.max_spins = self.MAX_SPINS
        return True

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of this rank's `tensor` and the peer's, a new tensor (the input is untouched)."""
        if not self.can_reduce(tensor):
            raise ValueError(f"push all-reduce takes contiguous float tensors up to {self.slot_bytes} bytes")
        out = torch.empty_like(tensor)
        numel = tensor.numel()
        programs, chunk = grid_for(numel)
        views = self._views.get(tensor.dtype)
        if views is None:
            views = self._views[tensor.dtype] = (self.send.view(tensor.dtype), self.recv.view(tensor.dtype))
        _push_all_reduce_kernel[(programs,)](
            tensor, out, *views, self.send_flags, self.recv_flags,
            self.epochs, self.error, numel, chunk, self.slot_bytes // tensor.element_size(), self.max_spins,
            BLOCK=BLOCK, num_warps=NUM_WARPS)
        return out
