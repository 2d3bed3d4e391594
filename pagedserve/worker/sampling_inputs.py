"""Turn the sampling parameters of the rows that sample this step into SamplingTensors.

The per-row values come from each state's sampling_row (made once per request), the float
columns in use in one tensor and one copy; a Python pass visits only the rows that need more
(flat (row, token) index lists for the sparse parts: logit_bias, min_tokens masks,
allowed_token_ids, bad words, penalties). Optional tensors stay None when no row uses the
feature, so the common case (greedy or plain temperature) costs one argmax or one softmax.

Penalties and bad words read a row's output history, whose latest token may still be on the
device under async scheduling (a -1 placeholder on the host). The penalties read the outputs
where they are, the runner's OutputHistory on the device (which also holds the prompt's ids
where a repetition penalty reads them), as flat (row, token, in output) entries (the sampler's
apply_penalties). A bad word waiting on a placeholder bans its last token only where the
placeholder's token (`prev_sampled`, at the row's sampled_row) matches (BadWords.banned). So
no such request holds the engine in lockstep, and no [rows, vocab] table is built.

`sample` runs the sampler over at most SAMPLER_CHUNK_ROWS rows at a time: its float32 working
set (logits, log-softmax, sort values and indices, probabilities: ~40 bytes per row per
vocabulary entry) is then bounded whatever max_num_seqs is, and the KV cache keeps that memory.
Greedy rows without logprobs need less than half of that, so they go GREEDY_CHUNK_ROWS at a
time (chunk_rows). Rows that make no float32 copy at all (plain greedy; on CUDA, rows that only
draw: draws_in_place) go in one pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagedserve.layers import sampler as sampler_module
from pagedserve.layers.nucleus import MAX_TOP_K
from pagedserve.layers.sampler import _EPS as _GREEDY_EPS
from pagedserve.layers.sampler import Sampler, SamplerOutput, SamplingTensors
from pagedserve.worker.input_batch import CachedRequestState
from pagedserve.worker.output_history import OutputHistory

SAMPLER_CHUNK_ROWS = 128
GREEDY_CHUNK_ROWS = 2 * SAMPLER_CHUNK_ROWS   # chunk_rows


@dataclass
class _Columns:
    """Flat sparse indices, filled by the pass over the rows that need more than their values."""

    bias_rows: list[int] = field(default_factory=list)
    bias_tokens: list[int] = field(default_factory=list)
    bias_values: list[float] = field(default_factory=list)
    mask_rows: list[int] = field(default_factory=list)
    mask_tokens: list[int] = field(default_factory=list)
    allowed: list[tuple[int, torch.Tensor]] = field(default_factory=list)   # (row, its allowed_tokens)
    ban_rows: list[int] = field(default_factory=list)   # bad_words: (row, token) banned this step
    ban_tokens: list[int] = field(default_factory=list)
    ban_src: list[int] = field(default_factory=list)    # -1, or: only if prev_sampled[src] == ban_if
    ban_if: list[int] = field(default_factory=list)
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    max_logprobs: int | None = None


def draws_in_place(states: list[CachedRequestState], device: torch.device) -> bool:
    """Whether the rows need no float32 copy of their logits, so one sampler pass takes them all:
    plain greedy rows (one argmax), and on CUDA rows that only draw (Sampler: the nucleus kernel
    reads the logits in place; CachedRequestState.plain_draw)."""
    if all(state.plain_greedy for state in states):
        return True
    return device.type == "cuda" and sampler_module.NUCLEUS_SAMPLING and all(state.plain_draw for state in states)


def chunk_rows(states: list[CachedRequestState]) -> int:
    """How many rows one sampler pass takes. Greedy rows without logprobs never sort, softmax
    or log-softmax: their float32 working set is the logits' copy and its out-of-place edits
    (penalties, bias, bans, masks: at most ~17 bytes per row per vocabulary entry, with
    min_tokens' masks), so GREEDY_CHUNK_ROWS of them fit the bound the memory profile measured
    for SAMPLER_CHUNK_ROWS rows of the full path (~40 bytes; tests/kernels/test_sampler_memory.py
    checks it on CUDA)."""
    if all(state.sampling_row[0] < _GREEDY_EPS and state.sampling_params.logprobs is None for state in states):
        return GREEDY_CHUNK_ROWS
    return SAMPLER_CHUNK_ROWS


def sample(sampler: Sampler, logits: torch.Tensor, states: list[CachedRequestState], vocab_size: int,
           device: torch.device, eos_token_ids: tuple[int, ...], bitmask: torch.Tensor | None = None,
           prev_sampled: torch.Tensor | None = None, history: OutputHistory | None = None) -> SamplerOutput:
    """Sample one token per row of `logits` (row i belongs to states[i]), in chunks of rows.
    `bitmask`: the rows' structured-outputs token bitmask on the device (Sampler).
    `prev_sampled`: the last launched step's sampled ids on the device (rows' placeholders);
    `history`: the penalised rows' outputs (build_sampling_tensors)."""
    size = len(states) if draws_in_place(states, device) else chunk_rows(states)
    if len(states) <= size:   # one pass
        return sampler(logits, build_sampling_tensors(states, vocab_size, device, eos_token_ids, prev_sampled,
                                                      history), bitmask)
    return SamplerOutput.cat([
        sampler(logits[start:start + size],
                build_sampling_tensors(states[start:start + size], vocab_size, device, eos_token_ids,
                                       prev_sampled, history),
                None if bitmask is None else bitmask[start:start + size])
        for start in range(0, len(states), size)])


def build_sampling_tensors(states: list[CachedRequestState], vocab_size: int, device: torch.device,
                           eos_token_ids: tuple[int, ...], prev_sampled: torch.Tensor | None = None,
                           history: OutputHistory | None = None) -> SamplingTensors:
    """Reads the states (mutates nothing). Rows are in `states` order. Bad words waiting on a
    placeholder need `prev_sampled`, the ids it is in; penalised rows need `history`, which holds
    their outputs (each state's history_row)."""
    if all(state.plain_greedy for state in states):   # the common case: one argmax
        return SamplingTensors(temperature=torch.zeros(len(states), device=device), all_greedy=True)
    temperature, top_k, top_p, min_p, typical_p, repetition, frequency, presence = zip(
        *(state.sampling_row for state in states))
    c = _Columns()
    for row, state in enumerate(states):
        if state.sampling_extras:
            _collect_row(c, row, state, vocab_size, eos_token_ids)
    if c.ban_rows and prev_sampled is None and max(c.ban_src) >= 0:
        raise RuntimeError("a row's latest token is a placeholder, but no step's sampled ids were given")
    # the float columns in use (C-level min / max / any over each: no per-row Python), in one tensor and one copy
    used = {"top_p": min(top_p) < 1.0, "min_p": max(min_p) > 0.0, "typical_p": min(typical_p) < 1.0,
            "repetition_penalty": min(repetition) != 1.0 or max(repetition) != 1.0,
            "frequency_penalty": any(frequency), "presence_penalty": any(presence)}
    columns = {"top_p": top_p, "min_p": min_p, "typical_p": typical_p, "repetition_penalty": repetition,
               "frequency_penalty": frequency, "presence_penalty": presence}
    names = [name for name, on in used.items() if on]
    floats = _tensor([temperature, *(columns[name] for name in names)], torch.float32, device)
    t = SamplingTensors(temperature=floats[0])
    for i, name in enumerate(names, 1):
        setattr(t, name, floats[i])
    t.all_greedy = max(temperature) < _GREEDY_EPS
    largest_k = max((k for k in top_k if 0 < k < vocab_size), default=None)
    if largest_k is not None:
        t.top_k = _tensor([k if 0 < k < vocab_size else vocab_size for k in top_k], torch.int64, device)
    # each row's way to draw, by its own parameters (Sampler: the nucleus path or the sort-based one)
    t.sort_rows = [] if not (used["typical_p"] or (largest_k or 0) > MAX_TOP_K) else [
        row for row, (k, mass) in enumerate(zip(top_k, typical_p)) if mass < 1.0 or MAX_TOP_K < k < vocab_size]
    sort_set = set(t.sort_rows)
    t.max_top_k = max((k for row, k in enumerate(top_k) if 0 < k < vocab_size and row not in sort_set), default=None) \
        if sort_set else largest_k
    if used["repetition_penalty"] or used["frequency_penalty"] or used["presence_penalty"]:
        counted = [(row, state) for row, state in enumerate(states) if state.counts_outputs]
        if history is None or min(state.history_row for _, state in counted) < 0:
            raise RuntimeError("penalised rows need their outputs in an OutputHistory")
        # the seen tokens as flat (row, token, in output) entries on the device, from the history
        # (a [rows, vocab] table a step cost ~65 MB at a 128k vocabulary)
        rows, counted_states = zip(*counted)
        t.seen_rows, t.seen_tokens, t.seen_in_output = history.entries(list(rows), list(counted_states))
    if c.bias_rows:
        t.bias_rows = _tensor(c.bias_rows, torch.int64, device)
        t.bias_tokens = _tensor(c.bias_tokens, torch.int64, device)
        t.bias_values = _tensor(c.bias_values, torch.float32, device)
    if c.mask_rows:
        t.mask_rows = _tensor(c.mask_rows, torch.int64, device)
        t.mask_tokens = _tensor(c.mask_tokens, torch.int64, device)
    if c.ban_rows:
        t.ban_rows = _tensor(c.ban_rows, torch.int64, device)
        t.ban_tokens = _tensor(c.ban_tokens, torch.int64, device)
        if max(c.ban_src) >= 0:   # some bans wait on a placeholder's token
            src = _tensor(c.ban_src, torch.int64, device)
            t.ban_active = (src < 0) | (prev_sampled[src.clamp(min=0)] == _tensor(c.ban_if, torch.int64, device))
    if c.allowed:   # the rows' cached id tensors: no per-token Python work a step
        rows = torch.tensor([row for row, _ in c.allowed])
        lengths = torch.tensor([len(tokens) for _, tokens in c.allowed])
        t.allow_rows = torch.repeat_interleave(rows, lengths).to(device, non_blocking=True)
        t.allow_tokens = torch.cat([tokens for _, tokens in c.allowed]).to(device, non_blocking=True)
    t.generators = c.generators
    t.max_num_logprobs = c.max_logprobs
    return t


def _collect_row(c: _Columns, row: int, state: CachedRequestState, vocab_size: int,
                 eos_token_ids: tuple[int, ...]) -> None:
    """A row that needs more than its sampling_row values (its sampling_extras)."""
    p = state.sampling_params
    for token, value in (p.logit_bias or {}).items():
        if token < vocab_size:
            c.bias_rows.append(row)
            c.bias_tokens.append(token)
            c.bias_values.append(value)
    if state.allowed_tokens is not None:
        c.allowed.append((row, state.allowed_tokens))
    if state.bad_words is not None:
        banned, conditional = state.bad_words.banned(state.token_ids, state.num_prompt_tokens)
        c.ban_rows.extend([row] * (len(banned) + len(conditional)))
        c.ban_tokens.extend(banned)
        c.ban_src.extend([-1] * len(banned))
        c.ban_if.extend([-1] * len(banned))
        for token, condition in conditional:
            c.ban_tokens.append(token)
            c.ban_src.append(state.sampled_row)
            c.ban_if.append(condition)
    if state.num_output_tokens < p.min_tokens:
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        for token in sorted(stops):
            if token < vocab_size:
                c.mask_rows.append(row)
                c.mask_tokens.append(token)
    if state.generator is not None:
        c.generators[row] = state.generator
    if p.logprobs is not None:
        c.max_logprobs = max(p.logprobs, c.max_logprobs or 0)


def _tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
