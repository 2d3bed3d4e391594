"""Turn the sampling parameters of the rows that sample this step into SamplingTensors.

One Python pass over the rows collects plain lists (and flat (row, token) index lists for
the sparse parts: logit_bias, min_tokens masks, allowed_token_ids, bad words); each tensor is
then built in one call. Optional tensors stay None when no row uses the feature, so the
common case (greedy or plain temperature) costs one argmax or one softmax.

Penalties and bad words read a row's output history, whose latest token may still be on the
device under async scheduling (a -1 placeholder on the host). The penalties read the outputs
where they are, the runner's OutputHistory on the device, and each row's prompt ids, copied
there once (CachedRequestState.prompt_ids), as flat (row, token) entries (the sampler's
apply_penalties). A bad word waiting on a placeholder bans its last token only where the
placeholder's token (`prev_sampled`, at the row's sampled_row) matches (BadWords.banned). So
no such request holds the engine in lockstep, and no [rows, vocab] table is built.

`sample` runs the sampler over at most SAMPLER_CHUNK_ROWS rows at a time: its float32 working
set (logits, log-softmax, sort values and indices, probabilities: ~40 bytes per row per
vocabulary entry) is then bounded whatever max_num_seqs is, and the KV cache keeps that memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagedserve.layers.sampler import Sampler, SamplerOutput, SamplingTensors
from pagedserve.worker.input_batch import CachedRequestState
from pagedserve.worker.output_history import OutputHistory

SAMPLER_CHUNK_ROWS = 128


@dataclass
class _Columns:
    """Per-row values and flat sparse indices, filled by the one pass over the rows."""

    temperature: list[float] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)
    min_p: list[float] = field(default_factory=list)
    typical_p: list[float] = field(default_factory=list)
    repetition: list[float] = field(default_factory=list)
    frequency: list[float] = field(default_factory=list)
    presence: list[float] = field(default_factory=list)
    counted_rows: list[int] = field(default_factory=list)   # penalised rows, and their states
    counted: list[CachedRequestState] = field(default_factory=list)
    prompts: list[tuple[int, torch.Tensor]] = field(default_factory=list)   # (row, its prompt ids on the device)
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


def sample(sampler: Sampler, logits: torch.Tensor, states: list[CachedRequestState], vocab_size: int,
           device: torch.device, eos_token_ids: tuple[int, ...], bitmask: torch.Tensor | None = None,
           prev_sampled: torch.Tensor | None = None, history: OutputHistory | None = None) -> SamplerOutput:
    """Sample one token per row of `logits` (row i belongs to states[i]), in chunks of rows.
    `bitmask`: the rows' structured-outputs token bitmask on the device (Sampler).
    `prev_sampled`: the last launched step's sampled ids on the device (rows' placeholders);
    `history`: the penalised rows' outputs (build_sampling_tensors)."""
    if len(states) <= SAMPLER_CHUNK_ROWS or all(state.plain_greedy for state in states):   # one pass
        return sampler(logits, build_sampling_tensors(states, vocab_size, device, eos_token_ids, prev_sampled,
                                                      history), bitmask)
    return SamplerOutput.cat([
        sampler(logits[start:start + SAMPLER_CHUNK_ROWS],
                build_sampling_tensors(states[start:start + SAMPLER_CHUNK_ROWS], vocab_size, device, eos_token_ids,
                                       prev_sampled, history),
                None if bitmask is None else bitmask[start:start + SAMPLER_CHUNK_ROWS])
        for start in range(0, len(states), SAMPLER_CHUNK_ROWS)])


def build_sampling_tensors(states: list[CachedRequestState], vocab_size: int, device: torch.device,
                           eos_token_ids: tuple[int, ...], prev_sampled: torch.Tensor | None = None,
                           history: OutputHistory | None = None) -> SamplingTensors:
    """Reads the states (mutates nothing but a row's cached prompt ids). Rows are in `states`
    order. Bad words waiting on a placeholder need `prev_sampled`, the ids it is in; penalised
    rows need `history`, which holds their outputs (each state's history_row)."""
    if all(state.plain_greedy for state in states):   # the common case: one argmax
        return SamplingTensors(temperature=torch.zeros(len(states), device=device), all_greedy=True)
    c = _Columns()
    for row, state in enumerate(states):
        _collect_row(c, row, state, vocab_size, eos_token_ids, device)
    if any(src >= 0 for src in c.ban_src) and prev_sampled is None:
        raise RuntimeError("a row's latest token is a placeholder, but no step's sampled ids were given")
    if c.counted and (history is None or any(state.history_row < 0 for state in c.counted)):
        raise RuntimeError("penalised rows need their outputs in an OutputHistory")
    t = SamplingTensors(temperature=_tensor(c.temperature, torch.float32, device))
    t.all_greedy = all(value < 1e-5 for value in c.temperature)
    if any(k < vocab_size for k in c.top_k):
        t.top_k = _tensor(c.top_k, torch.int64, device)
    if any(p < 1.0 for p in c.top_p):
        t.top_p = _tensor(c.top_p, torch.float32, device)
    if any(p > 0.0 for p in c.min_p):
        t.min_p = _tensor(c.min_p, torch.float32, device)
    if any(p < 1.0 for p in c.typical_p):
        t.typical_p = _tensor(c.typical_p, torch.float32, device)
    _add_penalties(t, c, device, history)
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
        if any(src >= 0 for src in c.ban_src):   # some bans wait on a placeholder's token
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
                 eos_token_ids: tuple[int, ...], device: torch.device) -> None:
    p = state.sampling_params
    c.temperature.append(p.temperature)
    c.top_k.append(p.top_k if 0 < p.top_k < vocab_size else vocab_size)
    c.top_p.append(p.top_p)
    c.min_p.append(p.min_p)
    c.typical_p.append(p.typical_p)
    c.repetition.append(p.repetition_penalty)
    c.frequency.append(p.frequency_penalty)
    c.presence.append(p.presence_penalty)
    if state.counts_outputs:   # penalties: its outputs are counted from the history on the device
        c.counted_rows.append(row)
        c.counted.append(state)
        if p.repetition_penalty != 1.0:
            c.prompts.append((row, state.prompt_ids(device)))
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


def _add_penalties(t: SamplingTensors, c: _Columns, device: torch.device, history: OutputHistory | None) -> None:
    use_rep = any(v != 1.0 for v in c.repetition)
    use_freq = any(v != 0.0 for v in c.frequency)
    use_pres = any(v != 0.0 for v in c.presence)
    if not (use_rep or use_freq or use_pres):
        return
    # the seen tokens as flat (row, token) entries on the device: outputs from the history, prompts
    # from each row's cached ids (a [rows, vocab] table a step cost ~65 MB at a 128k vocabulary)
    rows, tokens = history.entries(c.counted_rows, c.counted)
    in_output = torch.ones(rows.shape[0], dtype=torch.bool, device=device)
    if c.prompts:
        lengths = [ids.shape[0] for _, ids in c.prompts]
        prompt_rows = _tensor([row for row, _ in c.prompts], torch.int64, device)
        rows = torch.cat([rows, torch.repeat_interleave(prompt_rows, _tensor(lengths, torch.int64, device),
                                                        output_size=sum(lengths))])
        tokens = torch.cat([tokens, *(ids for _, ids in c.prompts)])
        in_output = torch.cat([in_output, torch.zeros(sum(lengths), dtype=torch.bool, device=device)])
    t.seen_rows, t.seen_tokens, t.seen_in_output = rows, tokens, in_output
    if use_rep:
        t.repetition_penalty = _tensor(c.repetition, torch.float32, device)
    if use_freq:
        t.frequency_penalty = _tensor(c.frequency, torch.float32, device)
    if use_pres:
        t.presence_penalty = _tensor(c.presence, torch.float32, device)
