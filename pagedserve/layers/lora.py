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
kernel of its own, the same code on the CPU and on CUDA. A row-parallel layer adds its partial
delta before the all-reduce: the sum over ranks of (x_r @ a_r.T) @ b.T is the whole delta.

The step's token -> slot map is set once per forward (`LoraStep.set`, one object per model, shared
by its layers) by the model runner; None (no token of the step has an adapter) skips every delta."""
from __future__ import annotations

import torch

class LoraStep:
    """A model's current step for its LoRA layers: each token's slot, and the masks made of it."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None    # [num_tokens] int64, -1 = no adapter
        self.masks: dict[int, torch.Tensor] = {}  # this step's masks by column count

    def set(self, slots: torch.Tensor | None) -> None:
        """The step's token -> slot map (None: no adapter anywhere in the step)."""
        self.slots = slots
        self.masks = {}


class LoraWeights:
    def __init__(self, step: LoraStep, num_slots: int, max_rank: int, num_slices: int, in_features: int,
                 out_features: int, dtype: torch.dtype, device: torch.device) -> None:
        self.step = step
        self.num_slots, self.max_rank, self.num_slices = num_slots, max_rank, num_slices
        width = num_slots * num_slices * max_rank
        self.a = torch.zeros((width, in_features), dtype=dtype, device=device)
        self.b = torch.zeros((out_features, width), dtype=dtype, device=device)
        self.column_slot = torch.arange(num_slots, device=device).repeat_interleave(num_slices * max_rank)

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

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The adapters' contribution to this layer's output for the step's tokens, or None."""
        step = self.step
        if step.slots is None:
            return None
        width = self.a.shape[0]
        mask = step.masks.get(width)
        if mask is None or mask.shape[0] != x.shape[0]:
            mask = (step.slots[:x.shape[0], None] == self.column_slot[None, :]).to(x.dtype)
            step.masks[width] = mask
        return ((x @ self.a.t()) * mask) @ self.b.t()
