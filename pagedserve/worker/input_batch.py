"""The runner's persistent per-request state, and the flattening of one step's scheduled
tokens into model inputs (token ids, positions, slot mapping, block tables).

Rows are ordered decodes first, then prefill chunks, so attention backends can treat the
`num_decodes` leading rows as a batch of single-token queries.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagedserve.attention.metadata import AttentionMetadata
from pagedserve.core.request import RequestId
from pagedserve.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: RequestId
    token_ids: list[int]              # prompt + outputs sampled so far
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None = None
    output_counts: dict[int, int] = field(default_factory=dict)   # for frequency/presence penalties
    # Async scheduling: index in token_ids of the latest sampled token still on the device
    # (a -1 placeholder until its step is resolved), else -1.
    pending_pos: int = -1

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def append_output(self, token: int) -> None:
        self.token_ids.append(token)
        self.output_counts[token] = self.output_counts.get(token, 0) + 1


@dataclass
class StepInputs:
    """One step, flattened. `rows` lists the scheduled requests in row order."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    rows: list[CachedRequestState]
    query_lens: list[int]
    # Rows whose tokens reach the end of their known tokens: they sample this step.
    logits_indices: torch.Tensor
    sample_rows: list[int]


def build_step_inputs(states: list[CachedRequestState], num_scheduled: list[int], block_size: int,
                      device: torch.device) -> StepInputs:
    """Flatten the scheduled requests (any order) into decode-first model inputs."""
    order = sorted(range(len(states)), key=lambda i: num_scheduled[i] != 1)
    rows = [states[i] for i in order]
    query_lens = [num_scheduled[i] for i in order]
    num_tokens = sum(query_lens)
    input_ids = np.empty(num_tokens, dtype=np.int64)
    positions = np.empty(num_tokens, dtype=np.int64)
    seq_lens = np.empty(len(rows), dtype=np.int32)
    max_blocks = max(len(s.block_ids) for s in rows)
    block_tables = np.zeros((len(rows), max_blocks), dtype=np.int32)
    logits_indices, sample_rows = [], []
    offset = 0
    for row, (state, q_len) in enumerate(zip(rows, query_lens)):
        start = state.num_computed_tokens
        end = start + q_len
        input_ids[offset:offset + q_len] = state.token_ids[start:end]
        positions[offset:offset + q_len] = np.arange(start, end)
        seq_lens[row] = end
        block_tables[row, :len(state.block_ids)] = state.block_ids
        offset += q_len
        if end == len(state.token_ids):
            logits_indices.append(offset - 1)
            sample_rows.append(row)
    # slot = block_table[pos // block_size] * block_size + pos % block_size
    row_of_token = np.repeat(np.arange(len(rows)), query_lens)
    slot_mapping = block_tables[row_of_token, positions // block_size].astype(np.int64) * block_size \
        + positions % block_size
    query_start_loc = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=query_start_loc[1:])
    num_decodes = sum(1 for q in query_lens if q == 1)

    def to(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(device, non_blocking=True)

    meta = AttentionMetadata(slot_mapping=to(slot_mapping), query_start_loc=to(query_start_loc),
                             seq_lens=to(seq_lens), block_tables=to(block_tables),
                             max_query_len=max(query_lens), max_seq_len=int(seq_lens.max()),
                             num_decodes=num_decodes, num_decode_tokens=num_decodes)
    return StepInputs(input_ids=to(input_ids), positions=to(positions), meta=meta, rows=rows,
                      query_lens=query_lens, logits_indices=to(np.array(logits_indices, dtype=np.int64)),
                      sample_rows=sample_rows)
