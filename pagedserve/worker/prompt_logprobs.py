"""prompt_logprobs: the logprobs of each prompt token given its prefix, from a step's final
hidden states (ModelRunner.execute_model calls it for a step with rows that ask), through the
model's LM head a bounded chunk of positions at a time."""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.engine_io import RequestId, TokenLogprobs
from pagedserve.layers.sampler import gather_logprobs
from pagedserve.worker.input_batch import StepInputs
from pagedserve.worker.sampling_inputs import SAMPLER_CHUNK_ROWS


def compute_prompt_logprobs(model: nn.Module, inputs: StepInputs, hidden: torch.Tensor
                            ) -> dict[RequestId, list[TokenLogprobs]]:
    """For rows asking prompt_logprobs: logprobs of each prompt token given its prefix."""
    out: dict[RequestId, list[TokenLogprobs]] = {}
    offset = 0
    for state, q_len in zip(inputs.rows, inputs.query_lens):
        k = state.sampling_params.prompt_logprobs
        start = state.num_computed_tokens - q_len
        if k is not None and start < state.num_prompt_tokens:
            # positions start..end-1 predict tokens start+1..end (within the prompt)
            end = min(state.num_computed_tokens, state.num_prompt_tokens - 1)
            rows = []
            # SAMPLER_CHUNK_ROWS positions at a time, the sampler's profiled working set: a
            # whole 8k-token chunk's fp32 log-softmax over a 128k vocabulary is ~4 GB, taken
            # from what the KV cache was sized to leave
            for lo in range(start, end, SAMPLER_CHUNK_ROWS):
                hi = min(lo + SAMPLER_CHUNK_ROWS, end)
                logits = model.compute_logits(hidden[offset + lo - start:offset + hi - start])
                if logits is None:
                    break
                targets = torch.tensor(state.token_ids[lo + 1:hi + 1], device=logits.device)
                ids, lps, ranks = gather_logprobs(logits.float().log_softmax(-1), targets, k)
                rows += map(TokenLogprobs, ids.tolist(), lps.tolist(), ranks.tolist())
            if rows:
                out[state.req_id] = rows
        offset += q_len
    return out
