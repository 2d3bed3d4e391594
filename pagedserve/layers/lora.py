"""LoRA adapters on the linear layers (vLLM's multi-LoRA): up to `num_slots` adapters live on the
device at once, each token of a step reading the one of its request (or none).

A linear layer with LoRA holds, for its `n` output slices (q, k, v of qkv_proj; gate, up of
gate_up_proj; one for o_proj / down_proj) and every slot, the adapters' factors zero-padded to
`max_rank`, slot-major:

    a  [S * n * R, in]    rows  (slot s, slice j, r) = A_j of slot s (this rank's input part
                          under a row-parallel layer)
    b  [out, S * n * R]   the columns of (s, j) hold B_j * scaling in slice j's output rows
                          (this rank's rows under a column-parallel layer), zero elsewhere

and adds  ((x @ a.T) * mask) @ b.T  where mask[t, c] is 1 when column c belongs to token t's slot:
two dense matmuls of inner size S * n * R (small: vLLM's default is one slot of rank 16), no
kernel of its own, the same code on the CPU and on CUDA; where the base product does each row's
arithmetic alike whatever the batch (GGUF's C++ kernels on the CPU), the deltas go through
gguf_cpu.row_matmul, which does too (LoraWeights). A row-parallel layer adds its partial
delta before the all-reduce: the sum over ranks of (x_r @ a_r.T) @ b.T is the whole delta.

The step's token -> slot map is set once per forward (`LoraStep.set`, one object per model, shared
by its layers) by the model runner, which writes the masks into static buffers (one per slice
count) that CUDA graphs read at replay: the graphs captured with LoRA on always add the deltas
(rows of the base model's tokens, and a bucket's padded rows, are zero in the masks). An eager
forward whose step has no adapter anywhere skips every delta."""
from __future__ import annotations

import torch

from pagedserve.layers.quantization import gguf_cpu


class LoraStep:
    """A model's current step for its LoRA layers: each token's slot, as masks in static buffers
    of `capacity` rows (the most tokens a step has: larger eager steps get masks of their own)."""

    def __init__(self, num_slots: int, max_rank: int, capacity: int, device: torch.device) -> None:
        self.num_slots, self.max_rank, self.capacity, self.device = num_slots, max_rank, capacity, device
        self.active = False                  # some token of this step has an adapter
        self.slots: torch.Tensor | None = None   # this step's [num_tokens] int64 slots (-1: none), while active
        self.rows = 0                        # the masks' rows written since last zeroed
        # slice count -> (each column's slot, the static mask [capacity, columns])
        self.masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def register(self, num_slices: int, dtype: torch.dtype) -> None:
        """A layer of `num_slices` output slices joins: its columns' slots and static mask (set-up,
        before any capture; one pair per slice count)."""
        if num_slices not in self.masks:
            column_slot = torch.arange(self.num_slots, device=self.device).repeat_interleave(num_slices * self.max_rank)
            mask = torch.zeros((self.capacity, column_slot.numel()), dtype=dtype, device=self.device)
            self.masks[num_slices] = (column_slot, mask)

    def set(self, slots: torch.Tensor | None) -> None:
        """The step's token -> slot map (None: no adapter anywhere in the step); rewrites the rows
        of the static masks that this step or the last one touched."""
        self.active, self.slots = slots is not None, slots
        n = 0 if slots is None or slots.shape[0] > self.capacity else slots.shape[0]
        for column_slot, mask in self.masks.values():
            if n:
                mask[:n] = slots[:, None] == column_slot[None, :]
            if self.rows > n:
                mask[n:self.rows] = 0
        self.rows = n

    def mask(self, num_slices: int, rows: int) -> torch.Tensor | None:
        """The step's mask for a layer of `num_slices` slices over `rows` tokens; None: no delta
        (an eager forward of a step without adapters)."""
        column_slot, mask = self.masks[num_slices]
        if rows > self.capacity:   # an eager step past the static rows
            return None if not self.active else (self.slots[:rows, None] == column_slot[None, :]).to(mask.dtype)
        return mask[:rows] if self.active or _capturing(mask) else None


def _capturing(mask: torch.Tensor) -> bool:
    """A CUDA graph is being captured: it records the delta whatever this step holds."""
    return mask.is_cuda and torch.cuda.is_current_stream_capturing()


class LoraWeights:
    """One linear layer's adapters. `independent_rows` (CPU): up to that many tokens the base
    product does each row's arithmetic alike whatever the batch (the GGUF C++ kernels), and so do
    the deltas: the factors are kept transposed and multiplied by gguf_cpu.row_matmul, each
    output summed in one order (torch's CPU matmul rounds a row differently at one row and at
    several, which an adapter's deltas carry through every later layer)."""

    def __init__(self, step: LoraStep, num_slices: int, in_features: int, out_features: int,
                 dtype: torch.dtype, device: torch.device, independent_rows: int = 0) -> None:
        self.step = step
        self.num_slots, self.max_rank, self.num_slices = step.num_slots, step.max_rank, num_slices
        self.independent_rows = independent_rows
        width = self.num_slots * num_slices * self.max_rank
        if independent_rows:   # a [width, in] and b [out, width] as views of their transposes
            self.a_t = torch.zeros((in_features, width), dtype=dtype, device=device)
            self.b_t = torch.zeros((width, out_features), dtype=dtype, device=device)
            self.a, self.b = self.a_t.t(), self.b_t.t()
        else:
            self.a = torch.zeros((width, in_features), dtype=dtype, device=device)
            self.b = torch.zeros((out_features, width), dtype=dtype, device=device)
        step.register(num_slices, dtype)

    def columns(self, slot: int, index: int, rank: int) -> slice:
        start = (slot * self.num_slices + index) * self.max_rank
        return slice(start, start + rank)

    def clear(self, slot: int) -> None:
        cols = slice(slot * self.num_slices * self.max_rank, (slot + 1) * self.num_slices * self.max_rank)
        self.a[cols] = 0
        self.b[:, cols] = 0

    def set_slice(self, slot: int, index: int, a: torch.Tensor, b: torch.Tensor, out_offset: int) -> None:
        """Slice `index` of `slot`: a [r, in] (this rank's input part), b [size, r] already
        scaled (this rank's rows), written at output rows out_offset .. + size."""
        cols = self.columns(slot, index, a.shape[0])
        self.a[cols] = a.to(self.a.dtype)
        self.b[out_offset:out_offset + b.shape[0], cols] = b.to(self.b.dtype)

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out plus the adapters' contribution for the step's tokens x [T, in] (out itself when
        the step has none): the second matmul adds into out (addmm), three launches a layer."""
        mask = self.step.mask(self.num_slices, x.shape[0])
        if mask is None:
            return out
        if x.shape[0] <= self.independent_rows:
            return out + gguf_cpu.row_matmul(gguf_cpu.row_matmul(x, self.a_t) * mask.to(x.dtype), self.b_t)
        shrunk = (x @ self.a.t()) * mask.to(x.dtype)
        if out.dim() == 2 and out.dtype == shrunk.dtype:
            return torch.addmm(out, shrunk, self.b.t())
        return out + shrunk @ self.b.t()
