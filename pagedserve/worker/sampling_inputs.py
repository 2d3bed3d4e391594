"""Turn the sampling parameters of the rows that sample this step into SamplingTensors.
Optional tensors stay None when no row uses the feature, so the common case (greedy or
plain temperature) costs one argmax or one softmax."""
from __future__ import annotations

import torch

from pagedserve.layers.sampler import SamplingTensors
from pagedserve.worker.input_batch import CachedRequestState


def build_sampling_tensors(states: list[CachedRequestState], vocab_size: int, device: torch.device,
                           eos_token_ids: tuple[int, ...]) -> SamplingTensors:
    params = [s.sampling_params for s in states]
    t = SamplingTensors(temperature=_tensor([p.temperature for p in params], torch.float32, device))
    t.all_greedy = all(p.temperature < 1e-5 for p in params)
    if any(p.top_k > 0 for p in params):
        t.top_k = _tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.int64, device)
    if any(p.top_p < 1.0 for p in params):
        t.top_p = _tensor([p.top_p for p in params], torch.float32, device)
    if any(p.min_p > 0.0 for p in params):
        t.min_p = _tensor([p.min_p for p in params], torch.float32, device)
    if any(p.typical_p < 1.0 for p in params):
        t.typical_p = _tensor([p.typical_p for p in params], torch.float32, device)
    _add_penalties(t, states, vocab_size, device)
    _add_biases(t, states, vocab_size, device, eos_token_ids)
    t.generators = {row: s.generator for row, s in enumerate(states) if s.generator is not None}
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    t.max_num_logprobs = max(wanted) if wanted else None
    return t


def _tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _add_penalties(t: SamplingTensors, states: list[CachedRequestState], vocab_size: int,
                   device: torch.device) -> None:
    params = [s.sampling_params for s in states]
    use_rep = any(p.repetition_penalty != 1.0 for p in params)
    use_freq = any(p.frequency_penalty != 0.0 for p in params)
    use_pres = any(p.presence_penalty != 0.0 for p in params)
    if not (use_rep or use_freq or use_pres):
        return
    counts = torch.zeros(len(states), vocab_size, dtype=torch.int32)
    prompt_mask = torch.zeros(len(states), vocab_size, dtype=torch.bool)
    for row, state in enumerate(states):
        if state.output_counts:
            ids = torch.tensor(list(state.output_counts.keys()), dtype=torch.int64)
            counts[row, ids] = torch.tensor(list(state.output_counts.values()), dtype=torch.int32)
        if use_rep:
            prompt_mask[row, torch.tensor(state.token_ids[:state.num_prompt_tokens], dtype=torch.int64)] = True
    t.output_counts = counts.to(device)
    t.prompt_mask = prompt_mask.to(device)
    if use_rep:
        t.repetition_penalty = _tensor([p.repetition_penalty for p in params], torch.float32, device)
    if use_freq:
        t.frequency_penalty = _tensor([p.frequency_penalty for p in params], torch.float32, device)
    if use_pres:
        t.presence_penalty = _tensor([p.presence_penalty for p in params], torch.float32, device)


def _add_biases(t: SamplingTensors, states: list[CachedRequestState], vocab_size: int, device: torch.device,
                eos_token_ids: tuple[int, ...]) -> None:
    bias_rows, bias_tokens, bias_values, mask_rows, mask_tokens = [], [], [], [], []
    for row, state in enumerate(states):
        p = state.sampling_params
        for token, value in (p.logit_bias or {}).items():
            if token < vocab_size:
                bias_rows.append(row)
                bias_tokens.append(token)
                bias_values.append(value)
        if state.num_output_tokens < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            for token in stops:
                if token < vocab_size:
                    mask_rows.append(row)
                    mask_tokens.append(token)
    if bias_rows:
        t.bias_rows = _tensor(bias_rows, torch.int64, device)
        t.bias_tokens = _tensor(bias_tokens, torch.int64, device)
        t.bias_values = _tensor(bias_values, torch.float32, device)
    if mask_rows:
        t.mask_rows = _tensor(mask_rows, torch.int64, device)
        t.mask_tokens = _tensor(mask_tokens, torch.int64, device)
