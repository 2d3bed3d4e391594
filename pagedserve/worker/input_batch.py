"""The runner's persistent per-request state, and the flattening of one step's scheduled
tokens into model inputs (token ids, positions, slot mapping, block tables).

Rows are ordered decodes first, then prefill chunks, so attention backends can treat the
`num_decodes` leading rows as a batch of single-token queries. Per-row work is a few list
comprehensions; the rest is numpy over whole columns (block tables are gathered from the
persistent BlockTable, not rebuilt from each request's list).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from pagedserve.attention.metadata import AttentionMetadata
from pagedserve.attention.cascade_plan import shared_prefix
from pagedserve.engine_io import RequestId
from pagedserve.layers.nucleus import MAX_TOP_K
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.bad_words import BadWords


@dataclass(eq=False, slots=True)
class CachedRequestState:
    req_id: RequestId
    token_ids: list[int]              # prompt + outputs sampled so far
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None = None
    # Async scheduling: index in token_ids of the latest sampled token still on the device
    # (a -1 placeholder until its step is resolved), else -1.
    pending_pos: int = -1
    sampled_row: int = -1   # row of the last launched step's samples (valid while pending_pos >= 0)
    block_row: int = -1     # this request's row of the runner's BlockTable
    lora_slot: int = -1     # its LoRA adapter's device slot; -1: the base model
    history_row: int = -1   # penalties: its row of the runner's OutputHistory (-1: none),
    history_len: int = 0    # how many ids are written there,
    history_prompt: int = 0   # of which the first are its prompt's (repetition penalty), the rest outputs
    counts_outputs: bool = field(init=False)   # penalties: its outputs are kept on the device (OutputHistory)
    plain_greedy: bool = field(init=False)   # SamplingParams.is_plain_greedy, read every step
    allowed_tokens: torch.Tensor | None = field(init=False)   # allowed_token_ids, once, as a sorted CPU tensor
    bad_words: BadWords | None = field(init=False)   # bad_words' token sequences, grouped once
    # the sampler's per-row values, read every step (sampling_inputs): temperature, top_k,
    # top_p, min_p, typical_p, repetition, frequency and presence penalties; and whether the row
    # needs more than those and its penalties' history (bias, masks, bans, a seed, logprobs)
    sampling_row: tuple = field(init=False)
    sampling_extras: bool = field(init=False)
    plain_draw: bool = field(init=False)

    def __post_init__(self) -> None:
        self.counts_outputs = self.sampling_params.has_penalties
        self.plain_greedy = self.sampling_params.is_plain_greedy
        allowed = self.sampling_params.allowed_token_ids
        self.allowed_tokens = None if allowed is None else torch.tensor(sorted(set(allowed)), dtype=torch.int64)
        sequences = self.sampling_params.bad_words_token_ids
        self.bad_words = BadWords(sequences) if sequences else None
        p = self.sampling_params
        self.sampling_row = (p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p, p.repetition_penalty,
                             p.frequency_penalty, p.presence_penalty)
        edits = bool(p.logit_bias or allowed is not None or self.bad_words or p.min_tokens or p.logprobs is not None)
        self.sampling_extras = edits or self.generator is not None
        # only temperature / top-k (up to nucleus.MAX_TOP_K) / top-p / min-p / a seed: the nucleus
        # kernel draws it from the model's logits in place (sampling_inputs.draws_in_place)
        self.plain_draw = not (edits or self.counts_outputs or p.typical_p < 1.0 or p.top_k > MAX_TOP_K)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def append_output(self, token: int) -> None:
        self.token_ids.append(token)

    def learn_token(self, pos: int, token: int) -> None:
        """The scheduler's token at `pos` (a SchedulerOutput's last_token_id): appended if new
        here; on a worker under async TP it may fill a placeholder (rank 0's placeholders are
        filled by PendingRunnerOutput.get())."""
        if len(self.token_ids) == pos:
            self.append_output(token)
        elif pos < len(self.token_ids) and self.token_ids[pos] == -1:
            self.token_ids[pos] = token
            if self.pending_pos == pos:
                self.pending_pos = -1


class BlockTable:
    """The block ids of every request the runner holds, one persistent int32 row each
    (entries past a request's blocks are 0). Rows are written only when blocks change, so a
    step gathers its block tables with one fancy index instead of converting each list."""

    def __init__(self, num_cols: int) -> None:
        self.array = np.zeros((0, max(num_cols, 1)), dtype=np.int32)
        self._free_rows: list[int] = []

    def add(self, block_ids: list[int]) -> int:
        """Take a free row (growing the array if none is left) holding `block_ids`."""
        if not self._free_rows:
            num_rows = len(self.array)
            grown = np.zeros((max(2 * num_rows, 64), self.array.shape[1]), dtype=np.int32)
            grown[:num_rows] = self.array
            self.array = grown
            self._free_rows = list(range(len(grown) - 1, num_rows - 1, -1))
        row = self._free_rows.pop()
        self.write(row, 0, block_ids)
        return row

    def write(self, row: int, start: int, block_ids: list[int]) -> None:
        """Set entries start .. start + len(block_ids) of `row`."""
        end = start + len(block_ids)
        if end > self.array.shape[1]:
            self.array = np.pad(self.array, ((0, 0), (0, end - self.array.shape[1])))
        self.array[row, start:end] = block_ids

    def remove(self, row: int) -> None:
        self.array[row] = 0
        self._free_rows.append(row)


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
    # The tensors are a decode CUDA graph's static inputs, copied there by its stage (the
    # tokens the previous step sampled on the device are fed inside the graph)
    staged: bool = False
    # The longest prefix a group of the step's decode rows shares (cascade_plan.shared_prefix; 0: no cascade)
    cascade_len: int = 0


DecodeStage = Callable[[list[CachedRequestState], dict[str, np.ndarray]], dict[str, torch.Tensor] | None]


def build_step_inputs(states: list[CachedRequestState], num_scheduled: list[int], block_size: int,
                      device: torch.device, block_table: BlockTable, decode_stage: DecodeStage | None = None,
                      cascade: bool = False) -> StepInputs:
    """Flatten the scheduled requests (any order) into decode-first model inputs. Reads the
    states' `block_row`s of `block_table`; mutates nothing. `decode_stage(rows, arrays)`: an
    all-decode step's arrays (input_ids, positions, slot_mapping, seq_lens, block_tables, and
    cascade_len / cascade_rows / cascade_groups where a shared prefix is found) go to it first; the
    device tensors it returns (a decode graph's static inputs, with query_start_loc and
    logits_indices), or None, and the step is
    copied as any other. `cascade`: the step looks for the prefix its decode rows share
    (attention/cascade_plan.shared_prefix)."""
    num_decodes = num_scheduled.count(1)
    if num_decodes == len(states):
        rows, query_lens = states, num_scheduled
    else:
        order = [i for i, q_len in enumerate(num_scheduled) if q_len == 1] \
            + [i for i, q_len in enumerate(num_scheduled) if q_len != 1]
        rows = [states[i] for i in order]
        query_lens = [num_scheduled[i] for i in order]
    starts = [state.num_computed_tokens for state in rows]
    token_ids = [state.token_ids[start] for state, start in zip(rows[:num_decodes], starts)]
    for state, start, q_len in zip(rows[num_decodes:], starts[num_decodes:], query_lens[num_decodes:]):
        token_ids += state.token_ids[start:start + q_len]
    input_ids = np.array(token_ids, dtype=np.int64)
    starts_np = np.array(starts, dtype=np.int64)
    # row r's tokens: input_ids[query_start_loc[r]:query_start_loc[r + 1]] at positions
    # starts[r] .. seq_lens[r] - 1; the row samples if seq_lens[r] reaches its known tokens
    if num_decodes == len(rows):   # every step of a decode phase: one token a row, no list conversions
        query_start_loc = np.arange(num_decodes + 1, dtype=np.int32)
        seq_lens = (starts_np + 1).astype(np.int32)
        positions = starts_np
        row_of_token = np.arange(num_decodes)
    else:
        lens_np = np.array(query_lens, dtype=np.int64)
        query_start_loc = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(lens_np, out=query_start_loc[1:])
        seq_lens = (starts_np + lens_np).astype(np.int32)
        positions = np.arange(len(token_ids), dtype=np.int64) + np.repeat(starts_np - query_start_loc[:-1], lens_np)
        row_of_token = np.repeat(np.arange(len(rows)), lens_np)
    sample_rows = np.flatnonzero(seq_lens == np.array([len(state.token_ids) for state in rows]))
    logits_indices = query_start_loc[1:][sample_rows].astype(np.int64) - 1
    max_blocks = max([len(state.block_ids) for state in rows])
    block_tables = block_table.array[[state.block_row for state in rows], :max_blocks]
    # slot = block_table[pos // block_size] * block_size + pos % block_size
    slot_mapping = block_tables[row_of_token, positions // block_size].astype(np.int64) * block_size \
        + positions % block_size

    cascade_len, extra = shared_prefix(block_tables[:num_decodes], seq_lens[:num_decodes], block_size) \
        if cascade and num_decodes else (0, {})
    staged = None
    if decode_stage is not None and num_decodes == len(rows):
        staged = decode_stage(rows, dict(input_ids=input_ids, positions=positions, slot_mapping=slot_mapping,
                                         seq_lens=seq_lens, block_tables=block_tables, **extra))
    if staged is not None:
        slots_t, input_ids_t, positions_t, logits_t, qsl_t, seq_lens_t, tables_t = (staged[name] for name in (
            "slot_mapping", "input_ids", "positions", "logits_indices", "query_start_loc", "seq_lens", "block_tables"))
        cascade_t = tuple(staged[name] for name in extra) if cascade_len else None
    else:
        (slots_t, input_ids_t, positions_t, logits_t, qsl_t, seq_lens_t, tables_t, *cascade_t) = to_device(
            [slot_mapping, input_ids, positions, logits_indices, query_start_loc, seq_lens, block_tables,
             *extra.values()], device)
        cascade_t = tuple(cascade_t) if cascade_t else None
    meta = AttentionMetadata(slot_mapping=slots_t, query_start_loc=qsl_t, seq_lens=seq_lens_t, block_tables=tables_t,
                             max_query_len=max(query_lens), max_seq_len=int(seq_lens.max()),
                             num_decodes=num_decodes, num_decode_tokens=num_decodes,
                             query_start_loc_host=query_start_loc, seq_lens_host=seq_lens, cascade=cascade_t)
    return StepInputs(input_ids=input_ids_t, positions=positions_t, meta=meta, rows=rows,
                      query_lens=query_lens, logits_indices=logits_t, sample_rows=sample_rows.tolist(),
                      staged=staged is not None, cascade_len=cascade_len)


def feed_inflight_tokens(inputs: StepInputs, prev_sampled: torch.Tensor) -> None:
    """Input ids still on the device (placeholders of the last launched step) are copied into
    `inputs` from that step's sampled ids, `prev_sampled` (each row's `sampled_row` of it). With
    one step in flight, a placeholder still pending at launch always belongs to the last
    launched step."""
    rows, query_lens = inputs.rows, np.array(inputs.query_lens)
    offsets = np.array([state.pending_pos - state.num_computed_tokens for state in rows])
    fed = np.flatnonzero((offsets >= 0) & (offsets < query_lens))
    if fed.size:
        dst = (np.cumsum(query_lens) - query_lens + offsets)[fed]
        src = np.array([state.sampled_row for state in rows])[fed]
        if PACK_STEP_INPUTS and dst[-1] == src[-1] == fed.size - 1 and (dst == src).all():
            # steady decode: the previous step's rows in place
            inputs.input_ids[:fed.size].copy_(prev_sampled[:fed.size])
            return
        index = torch.from_numpy(np.stack([dst, src])).to(prev_sampled.device, non_blocking=True)
        inputs.input_ids[index[0]] = prev_sampled[index[1]]


# Off: one pageable copy per array, as before (A/B measurements in benchmarks/decode_gpu.py).
PACK_STEP_INPUTS = True
_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}


def to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """The arrays on `device` through one host buffer (pinned on CUDA) and one copy: a step's
    seven small arrays as seven pageable copies cost the device ~2-3 us each and the host more
    (benchmarks/decode_gpu.py's step profile). Returns views of the copy, each 16-byte
    aligned (as Triton's launchers specialise pointers). On the CPU: the arrays themselves
    (torch.from_numpy, no copy)."""
    if device.type == "cpu":
        return [torch.from_numpy(np.ascontiguousarray(array)) for array in arrays]
    if not PACK_STEP_INPUTS:
        return [torch.from_numpy(array).to(device, non_blocking=True) for array in arrays]
    return packed(arrays, device)


def packed(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """to_device's copy through one host buffer (any device: the tests run it on the CPU)."""
    offsets, total = [], 0
    for array in arrays:
        offsets.append(total)
        total += -(-array.nbytes // 16) * 16
    host = torch.empty(max(total, 16), dtype=torch.uint8, pin_memory=device.type == "cuda")
    staging = host.numpy()
    for array, offset in zip(arrays, offsets):
        staging[offset:offset + array.nbytes] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    packed = host.to(device, non_blocking=True)
    return [packed[offset:offset + array.nbytes].view(_TORCH_DTYPES[array.dtype]).view(array.shape)
            for array, offset in zip(arrays, offsets)]

