"""On CUDA, the sampler's greedy chunks (GREEDY_CHUNK_ROWS rows: penalties, bias, bans,
min_tokens and allowed_token_ids on) peak below the working set the memory profile measures
(profile_run: SAMPLER_CHUNK_ROWS rows with top-p and 20 logprobs), so the larger greedy chunk
takes no memory the KV cache was given."""
from __future__ import annotations

import pytest
import torch

from pagedserve.layers.sampler import Sampler
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.input_batch import CachedRequestState
from pagedserve.worker.output_history import OutputHistory
from pagedserve.worker.profile_run import profiled_sampling_tensors
from pagedserve.worker.sampling_inputs import GREEDY_CHUNK_ROWS, SAMPLER_CHUNK_ROWS, build_sampling_tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
VOCAB = 128256


def _peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_greedy_chunk_fits_the_profiled_sampler_working_set():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    full_logits = torch.randn(SAMPLER_CHUNK_ROWS, VOCAB, device=dev).bfloat16()
    profiled = _peak(lambda: Sampler()(full_logits, profiled_sampling_tensors(SAMPLER_CHUNK_ROWS, dev)))

    history = OutputHistory(dev)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.1,
                            logit_bias={5: 1.0, 6: -1.0}, min_tokens=10_000, max_tokens=20_000, allowed_token_ids=list(range(0, VOCAB, 128)))
    params._bad_words_token_ids = [[7], [8, 9]]
    states = []
    for i in range(GREEDY_CHUNK_ROWS):
        ids = torch.randint(0, VOCAB, (900,), generator=gen).tolist()
        state = CachedRequestState(str(i), ids, 600, params, [0], 600)
        history.add(state)
        states.append(state)
    tensors = build_sampling_tensors(states, VOCAB, dev, (2,), history=history)
    logits = torch.randn(GREEDY_CHUNK_ROWS, VOCAB, device=dev).bfloat16()
    greedy = _peak(lambda: Sampler()(logits, tensors))
    print(f"sampler peak: greedy {GREEDY_CHUNK_ROWS} rows {greedy / 2**20:.1f} MiB, profiled {profiled / 2**20:.1f} MiB")
    assert greedy <= profiled, (greedy, profiled)
