"""The static input buffers the CUDA graphs (worker/cuda_graph.py) are captured over:

- DecodeStatics: a decode graph's inputs (ids, feed, positions, slots, sequence lengths, block
  table rows) in one device buffer laid out per bucket, so a step's inputs arrive in one host ->
  device copy of exactly its bucket's bytes;
- MixedStatics: the q / k / v and attention output that a mixed step's graph pieces and the eager
  attention between them share.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pagedserve.attention import cascade_plan


class MixedStatics:
    """The static tensors the pieces and the eager attention share: q/k/v in, attention out,
    [max_tokens, heads, head_dim] each (made at the first attention call, whose shapes they take)."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.q = self.k = self.v = self.out = None

    def fill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Copy this layer's q/k/v into the static buffers' first rows."""
        if self.q is None:
            self.q = query.new_zeros((self.max_tokens, *query.shape[1:]))
            self.out = torch.zeros_like(self.q)
            self.k = key.new_zeros((self.max_tokens, *key.shape[1:]))
            self.v = value.new_zeros((self.max_tokens, *value.shape[1:]))
        n = query.shape[0]
        self.q[:n].copy_(query)
        self.k[:n].copy_(key)
        self.v[:n].copy_(value)

    def views(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q[:n], self.k[:n], self.v[:n], self.out[:n]


class DecodeStatics:
    """The decode graphs' static inputs in one device buffer. The graph of bucket b reads b rows
    laid out from byte 0: input ids (int64), feed (int32: the row of the previous step's sampled
    ids that becomes this row's token, -1 none), positions and slots (int64), seq_lens (int32),
    each row's shared prefix keys (int32), the prefix groups' rows (int32) and their bounds (int32
    [CASCADE_MAX_GROUPS + 1]; the three attention/cascade_plan.shared_prefix's, 0: none), and the
    block table rows (int32 [b, max_blocks]),
    each 16-byte aligned; so a step's inputs are one copy of exactly its bucket's bytes from a
    pinned buffer laid out the same way. Padding rows: slot -1 (no KV write), seq_len 1, block
    row 0, feed -1, prefix keys 0."""

    FIELDS = (("input_ids", torch.int64), ("feed", torch.int32), ("positions", torch.int64),
              ("slot_mapping", torch.int64), ("seq_lens", torch.int32), ("cascade_len", torch.int32),
              ("cascade_rows", torch.int32), ("cascade_groups", torch.int32),
              ("block_tables", torch.int32))   # (block_tables last: stage() may copy it apart)
    PADDING = {"input_ids": 0, "feed": -1, "positions": 0, "slot_mapping": -1, "seq_lens": 1,
               "cascade_len": 0, "cascade_rows": 0, "cascade_groups": 0}   # block rows: 0

    def __init__(self, max_rows: int, max_blocks: int, device: torch.device) -> None:
        self.max_blocks = max_blocks
        self.device = device
        self.buffer = torch.zeros(self.layout(max_rows)[1], dtype=torch.uint8, device=device)
        self._views: dict[int, dict[str, torch.Tensor]] = {}

    def layout(self, rows: int) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...], int]], int]:
        """(name, dtype, shape, byte offset) of each field for `rows` rows, and the bytes in all."""
        fields, offset = [], 0
        for name, dtype in self.FIELDS:
            shape = (rows, self.max_blocks) if name == "block_tables" \
                else (cascade_plan.CASCADE_MAX_GROUPS + 1,) if name == "cascade_groups" else (rows,)
            fields.append((name, dtype, shape, offset))
            offset += -(-(dtype.itemsize * math.prod(shape)) // 16) * 16
        return fields, offset

    def views(self, rows: int) -> dict[str, torch.Tensor]:
        """Bucket `rows`'s fields, views of the buffer (what its graph was captured on)."""
        if rows not in self._views:
            self._views[rows] = {name: self.buffer[offset:offset + dtype.itemsize * math.prod(shape)].view(dtype).view(shape)
                                 for name, dtype, shape, offset in self.layout(rows)[0]}
        return self._views[rows]

    def pad(self, rows: int) -> None:
        """Bucket `rows`'s fields all padding rows (the buckets' layouts overlap in the one buffer:
        what a graph is captured on)."""
        views = self.views(rows)
        for name, value in self.PADDING.items():
            views[name].fill_(value)
        views["block_tables"].zero_()

    def stage(self, rows: int, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Copy a step's n <= rows rows (`arrays`: each field's n rows; block_tables [n, w <=
        max_blocks]) into bucket `rows`'s fields, in one copy while the bucket's block table is
        at most ONE_COPY_TABLE_BYTES (else a second copy of its [n, w] corner: long max_model_len
        at many rows, whose full rows would be megabytes a step); returns the bucket's views."""
        fields, total = self.layout(rows)
        tables = arrays["block_tables"]
        n, width = tables.shape
        table_offset = fields[-1][3]
        whole = rows * self.max_blocks * 4 <= ONE_COPY_TABLE_BYTES
        copied = total if whole else table_offset
        host = torch.empty(copied if whole else copied + n * width * 4, dtype=torch.uint8,
                           pin_memory=self.device.type == "cuda")
        staging = host.numpy()
        for name, dtype, shape, offset in fields:
            if name == "block_tables":
                array = tables
                if whole:
                    target = staging[offset:total].view(np.int32).reshape(shape)
                    target[:n, :width] = array
                    target[:n, width:] = 0
                    target[n:] = 0
                else:   # the corner after the other fields; stale rows and columns hold old block ids
                    staging[copied:].view(np.int32).reshape(n, width)[:] = array
                continue
            target = staging[offset:offset + dtype.itemsize * shape[0]].view(_NUMPY[dtype])
            array = arrays.get(name, ())   # (the cascade's: absent where the step has none)
            target[:len(array)] = array
            target[len(array):] = self.PADDING[name]
        views = self.views(rows)
        self.buffer[:copied].copy_(host[:copied], non_blocking=True)
        if not whole:
            views["block_tables"][:n, :width].copy_(host[copied:].view(torch.int32).view(n, width), non_blocking=True)
        return views


# A decode bucket's block table up to this many bytes travels whole in the step's one copy (128 rows at
# max_model_len 2048); past it the [n, w] corner is a second copy, as the step's own table was before.
ONE_COPY_TABLE_BYTES = 1 << 16
_NUMPY = {torch.int64: np.int64, torch.int32: np.int32}
