"""What every attention backend needs to know about one forward pass.

A step flattens the scheduled tokens of all requests into one ragged batch:

    tokens     | r0 chunk (3) | r1 decode (1) | r2 chunk (2) |
    query_start_loc  0              3               4              6
    seq_lens   = [computed_0 + 3, computed_1 + 1, computed_2 + 2]

A query token j of request s sits at position `seq_lens[s] - query_len[s] + j` and
attends to every cached position <= its own (causal inside the chunk, full attention to
the request's earlier blocks). K/V of the new tokens are written to the paged cache first
(`slot_mapping`), then attention reads everything through `block_tables`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Per-step tensors, all on the model's device. Immutable during the forward.

    slot_mapping:    [num_tokens] int64; block_id * block_size + offset; -1 = padding (skipped)
    query_start_loc: [num_seqs + 1] int32; cumulative query lengths
    seq_lens:        [num_seqs] int32; context length after this step (computed + new)
    block_tables:    [num_seqs, max_blocks_per_seq] int32; unused entries are 0
    max_query_len / max_seq_len: host ints, for launch grids and padding
    num_decodes:     the first `num_decodes` sequences have query_len == 1 (decode-first order)
    query_start_loc_host / seq_lens_host: the same on the host (eager steps; None in CUDA-graph
                     steps, whose values change at replay): long prefill chunks use them to run
                     torch's fused attention one sequence at a time
    cascade:         the shared prefixes of the step's decode rows (attention/triton_cascade.py), or None:
                     no cascade launch: (cascade_len int32 [>= decode rows], each row's shared keys, 0 none;
                     cascade_rows int32 [>= decode rows], the groups' rows; cascade_groups int32
                     [CASCADE_MAX_GROUPS + 1], the groups' bounds in cascade_rows: cascade_plan.shared_prefix)
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    num_decodes: int = 0
    num_decode_tokens: int = 0
    query_start_loc_host: Sequence[int] | None = None
    seq_lens_host: Sequence[int] | None = None
    cascade: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
