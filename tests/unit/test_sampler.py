"""The sampler against transformers' logits processors (same logits in, same processed
logits out) and seeded statistical checks of the draw (the penalties: test_penalties.py).

Processed logits are compared exactly: the same finite values and the same -inf set.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper, TypicalLogitsWarper)

from pagedserve.layers.sampler import Sampler, apply_bias_and_min_tokens, apply_temperature_and_filters
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.input_batch import CachedRequestState
from pagedserve.worker.output_history import OutputHistory
from pagedserve.worker.sampling_inputs import build_sampling_tensors

VOCAB = 512
EOS = (7,)
HISTORY = OutputHistory(torch.device("cpu"))   # the penalised states' outputs, as the runner keeps them


def make_state(params: SamplingParams, prompt: list[int] | None = None, outputs: list[int] | None = None,
               seed_generator: bool = True) -> CachedRequestState:
    prompt = prompt or [1, 2, 3]
    outputs = outputs or []
    generator = None
    if seed_generator and params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    state = CachedRequestState("r", list(prompt), len(prompt), params, [0], len(prompt), generator)
    for token in outputs:
        state.append_output(token)
    if state.counts_outputs:
        HISTORY.add(state)
    return state


def random_logits(rows: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


def hf_filters(scores: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """transformers' warpers in the sampler's order, for one row [1, V]."""
    ids = torch.zeros(1, 1, dtype=torch.long)
    if p.temperature > 0:
        scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    if p.min_p > 0.0:
        scores = MinPLogitsWarper(p.min_p)(ids, scores)
    if p.typical_p < 1.0:
        scores = TypicalLogitsWarper(p.typical_p)(ids, scores)
    return scores


def assert_same_processed(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs))
    finite = torch.isfinite(theirs)
    assert torch.isfinite(ours).eq(finite).all()
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=0, atol=0)


# One batch, one row per configuration, so per-row parameters are exercised side by side.
FILTER_ROWS = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_k=40),
    SamplingParams(temperature=0.9, top_p=0.8),
    SamplingParams(temperature=1.0, top_p=0.3),
    SamplingParams(temperature=0.5, top_k=50, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=2.0, min_p=0.2),
    SamplingParams(temperature=1.0, typical_p=0.5),
    SamplingParams(temperature=0.8, typical_p=0.9),
    SamplingParams(temperature=1.1, top_k=100, top_p=0.95, min_p=0.01),
    SamplingParams(temperature=1.0, top_k=-1, top_p=1.0),
]


def test_filters_match_transformers_per_row():
    logits = random_logits(len(FILTER_ROWS), seed=0)
    states = [make_state(p) for p in FILTER_ROWS]
    tensors = build_sampling_tensors(states, VOCAB, torch.device("cpu"), EOS, history=HISTORY)
    ours = apply_temperature_and_filters(logits, tensors)
    kept = torch.isfinite(ours).sum(dim=-1).tolist()
    for row, params in enumerate(FILTER_ROWS):
        assert_same_processed(ours[row:row + 1], hf_filters(logits[row:row + 1].clone(), params))
    # the filters did real work: the filtered rows keep strictly fewer than the whole vocabulary
    assert kept[0] == VOCAB and kept[-1] == VOCAB
    assert kept[1] == 5 and kept[2] == 40
    assert all(1 <= k < VOCAB for k in kept[3:-1])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_filters_match_transformers_random_params(seed):
    gen = torch.Generator().manual_seed(seed)

    def pick(values):
        return values[int(torch.randint(len(values), (1,), generator=gen))]

    rows = [SamplingParams(temperature=pick([0.3, 0.7, 1.0, 1.5]), top_k=pick([0, 1, 3, 20, 200]),
                           top_p=pick([1.0, 0.95, 0.6, 0.1]), min_p=pick([0.0, 0.02, 0.3]),
                           typical_p=pick([1.0, 0.95, 0.4]))
            for _ in range(24)]
    logits = random_logits(len(rows), seed=100 + seed, scale=float(pick([1.0, 3.0, 6.0])))
    ours = apply_temperature_and_filters(
        logits, build_sampling_tensors([make_state(p) for p in rows], VOCAB, torch.device("cpu"), EOS, history=HISTORY))
    for row, params in enumerate(rows):
        assert_same_processed(ours[row:row + 1], hf_filters(logits[row:row + 1].clone(), params))


def test_logit_bias_and_min_tokens_masks():
    states = [
        make_state(SamplingParams(logit_bias={10: 5.0, 20: -100.0}, min_tokens=2, stop_token_ids=[30]),
                   outputs=[1]),
        make_state(SamplingParams(min_tokens=2, stop_token_ids=[30]), outputs=[1, 2]),  # min reached
        make_state(SamplingParams(min_tokens=3, ignore_eos=True, stop_token_ids=[31])),
    ]
    logits = random_logits(3, seed=6)
    tensors = build_sampling_tensors(states, VOCAB, torch.device("cpu"), EOS, history=HISTORY)
    ours = apply_bias_and_min_tokens(logits, tensors)
    expected = logits.clone()
    expected[0, 10] += 5.0
    expected[0, 20] -= 100.0
    expected[0, [EOS[0], 30]] = float("-inf")
    expected[2, 31] = float("-inf")      # ignore_eos: EOS stays allowed, the stop token does not
    assert torch.equal(ours, expected)


def _bitmask(allowed_rows: list[list[int]]) -> torch.Tensor:
    """xgrammar's layout: int32 [rows, VOCAB / 32], bit t % 32 of word t // 32 set where t is allowed."""
    words = torch.zeros(len(allowed_rows), VOCAB // 32, dtype=torch.int64)
    for row, allowed in enumerate(allowed_rows):
        for token in allowed:
            words[row, token // 32] |= 1 << (token % 32)
    return words.to(torch.int32)


def test_a_complete_grammar_wins_over_min_tokens():
    """Rows under min_tokens whose grammar allows only EOS (row 0: complete) or EOS and one
    more token (row 1): row 0 samples EOS, row 1 the other token, at every temperature; the
    stop tokens stay masked in the row of an unconstrained request (row 2)."""
    params = [SamplingParams(min_tokens=2, temperature=t) for t in (0.0, 1.0)]
    for p in params:
        states = [make_state(p), make_state(p), make_state(p)]
        logits = random_logits(3, seed=9)
        logits[:, EOS[0]] = 50.0
        bitmask = _bitmask([[EOS[0]], [EOS[0], 9], list(range(VOCAB))])
        tensors = build_sampling_tensors(states, VOCAB, torch.device("cpu"), EOS, history=HISTORY)
        assert Sampler()(logits.clone(), tensors, bitmask).token_ids.tolist()[:2] == [EOS[0], 9]
        assert Sampler()(logits.clone(), tensors, bitmask).token_ids[2].item() != EOS[0]
        unconstrained = apply_bias_and_min_tokens(logits, tensors)
        assert torch.isneginf(unconstrained[:, EOS[0]]).all()   # without a grammar min_tokens always masks


def test_allowed_token_ids_restrict_greedy_and_sampled_rows():
    """Row 0 greedy and row 1 sampled (200 seeded draws) stay in their allowed set; row 2 (no
    list) keeps its own argmax; row 3 allows only EOS under min_tokens: EOS (the hard constraint
    wins, as a complete grammar does)."""
    allowed = [5, 9, 300]
    logits = random_logits(4, seed=11)
    logits[:, 400] = 30.0   # everyone's favourite, allowed in row 2 only
    greedy = SamplingParams(temperature=0.0, allowed_token_ids=allowed)
    states = [make_state(greedy), make_state(SamplingParams(temperature=1.0, allowed_token_ids=[9, 300])),
              make_state(SamplingParams(temperature=0.0, logit_bias={1: 0.5})),
              make_state(SamplingParams(temperature=0.0, min_tokens=3, allowed_token_ids=[EOS[0]]))]
    tensors = build_sampling_tensors(states, VOCAB, torch.device("cpu"), EOS, history=HISTORY)
    tokens = Sampler()(logits.clone(), tensors).token_ids.tolist()
    assert tokens[0] == max(allowed, key=lambda t: logits[0, t].item())
    assert tokens[2:] == [400, EOS[0]]
    torch.manual_seed(0)
    draws = {Sampler()(logits.clone(), tensors).token_ids[1].item() for _ in range(200)}
    assert draws <= {9, 300}
    assert not greedy.is_plain_greedy   # the runner's one-argmax fast path would ignore the list


@pytest.mark.parametrize("value", [[], [-1], ["5"], [True], 5])
def test_allowed_token_ids_validation(value):
    from pagedserve.errors import ValidationError
    with pytest.raises(ValidationError) as info:
        SamplingParams(allowed_token_ids=value)
    assert info.value.param == "allowed_token_ids"


# ---- the draw -------------------------------------------------------------------------

def sample(rows: list[SamplingParams], logits: torch.Tensor, outputs: list[list[int]] | None = None
           ) -> torch.Tensor:
    outputs = outputs or [[] for _ in rows]
    states = [make_state(p, outputs=out) for p, out in zip(rows, outputs)]
    return Sampler()(logits, build_sampling_tensors(states, VOCAB, torch.device("cpu"), EOS, history=HISTORY)).token_ids


def test_top_k_1_equals_greedy():
    torch.manual_seed(0)
    logits = random_logits(256, seed=7, scale=1.0)
    topk1 = sample([SamplingParams(temperature=1.5, top_k=1)] * 256, logits)
    greedy = sample([SamplingParams(temperature=0.0)] * 256, logits)
    assert torch.equal(topk1, logits.argmax(-1))
    assert torch.equal(greedy, logits.argmax(-1))
    plain = sample([SamplingParams(temperature=1.5)] * 256, logits)
    assert (plain != logits.argmax(-1)).sum() > 100   # without top_k=1 the draw does vary


def test_tiny_top_p_keeps_only_the_argmax():
    torch.manual_seed(1)
    logits = random_logits(256, seed=8, scale=0.5)
    tokens = sample([SamplingParams(temperature=1.0, top_p=1e-4)] * 256, logits)
    assert torch.equal(tokens, logits.argmax(-1))


def test_min_tokens_suppresses_eos():
    torch.manual_seed(2)
    logits = random_logits(64, seed=9)
    logits[:, EOS[0]] = 30.0   # EOS all but certain
    free = sample([SamplingParams(temperature=1.0)] * 64, logits)
    assert (free == EOS[0]).all()
    held = sample([SamplingParams(temperature=1.0, min_tokens=4)] * 64, logits, outputs=[[1, 2]] * 64)
    assert (held != EOS[0]).all()
    greedy_held = sample([SamplingParams(temperature=0.0, min_tokens=1)] * 64, logits)
    assert torch.equal(greedy_held, logits.clone().index_fill_(1, torch.tensor(EOS), float("-inf")).argmax(-1))
    done = sample([SamplingParams(temperature=1.0, min_tokens=2)] * 64, logits, outputs=[[1, 2]] * 64)
    assert (done == EOS[0]).all()


def test_logit_bias_forces_a_token():
    torch.manual_seed(3)
    logits = random_logits(64, seed=10)
    weakest = logits.argmin(-1)
    rows = [SamplingParams(temperature=t, logit_bias={int(w): 100.0}) for t, w in zip([0.0, 1.0] * 32, weakest)]
    assert torch.equal(sample(rows, logits), weakest)


def test_draw_follows_the_distribution():
    """Exponential-race sampling draws from softmax(logits / T): 40,000 draws, each
    frequency within 0.01 of its probability (about 5 standard errors)."""
    torch.manual_seed(4)
    small = torch.full((1, VOCAB), float("-inf"))
    small[0, :4] = torch.tensor([2.0, 1.0, 0.5, -1.0])
    logits = small.expand(40_000, VOCAB).contiguous()
    tokens = sample([SamplingParams(temperature=0.8)] * 40_000, logits)
    freq = torch.bincount(tokens, minlength=VOCAB)[:4].double() / 40_000
    probs = (small[0, :4] / 0.8).softmax(-1).double()
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.01)
    assert int(tokens.max()) < 4


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = random_logits(6, seed=11, scale=0.5)
    seeded = SamplingParams(temperature=1.0, seed=1234)

    def run(row_params: list[SamplingParams], row_logits: torch.Tensor, steps: int = 20) -> list[list[int]]:
        states = [make_state(p) for p in row_params]
        sampler, out = Sampler(), []
        for _ in range(steps):
            tensors = build_sampling_tensors(states, VOCAB, torch.device("cpu"), EOS, history=HISTORY)
            out.append(sampler(row_logits, tensors).token_ids.tolist())
        return [list(col) for col in zip(*out)]

    torch.manual_seed(5)
    alone = run([seeded], logits[2:3])[0]
    torch.manual_seed(6)   # the unseeded rows draw from the global generator: a different state
    batch = run([SamplingParams(temperature=1.0), SamplingParams(temperature=0.0), seeded,
                 SamplingParams(temperature=0.7, top_p=0.9, seed=99), SamplingParams(temperature=1.0, top_k=3),
                 SamplingParams(temperature=1.0, presence_penalty=1.0)], logits)
    assert batch[2] == alone
    assert len(set(alone)) > 5   # 20 draws from a flat distribution: really random
    other_seed = run([SamplingParams(temperature=1.0, seed=4321)], logits[2:3])[0]
    assert other_seed != alone


def test_greedy_rows_in_a_mixed_batch_are_exact_argmax_after_penalties():
    torch.manual_seed(7)
    logits = random_logits(4, seed=12)
    top = logits[1].argmax().item()
    rows = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0, frequency_penalty=2.0),
            SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=2)]
    tokens = sample(rows, logits, outputs=[[], [top] * 10, [], []])
    penalized = logits[1].clone()
    penalized[top] -= 20.0
    assert tokens[1].item() == penalized.argmax().item() != top
    assert tokens[2].item() == logits[2].argmax().item()


def test_logprobs_are_raw_whatever_the_processing():
    logits = random_logits(3, seed=13)
    rows = [SamplingParams(temperature=0.5, top_k=3, logprobs=5, logit_bias={0: 50.0}),
            SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=1.5),
            SamplingParams(temperature=1.0)]
    states = [make_state(p, outputs=[int(logits[1].argmax())]) for p in rows]
    out = Sampler()(logits, build_sampling_tensors(states, VOCAB, torch.device("cpu"), EOS, history=HISTORY))
    raw = logits.log_softmax(-1)
    assert out.token_ids[0].item() == 0      # the bias decided the draw ...
    assert out.logprob_token_ids.shape == (3, 6)   # sampled token + top-5 (the batch's max)
    for row in range(3):
        token = out.token_ids[row].item()
        top_lp, top_ids = raw[row].topk(5)
        assert out.logprob_token_ids[row].tolist() == [token] + top_ids.tolist()
        torch.testing.assert_close(out.logprobs[row], torch.cat([raw[row, token:token + 1], top_lp]),
                                   rtol=0, atol=0)   # ... but not the reported logprob
        assert out.sampled_ranks[row].item() == int((raw[row] > raw[row, token]).sum()) + 1
    assert out.sampled_ranks[0].item() > 1


def test_no_logprobs_requested_means_none_computed():
    out = Sampler()(random_logits(2, seed=14), build_sampling_tensors(
        [make_state(SamplingParams(temperature=0.0))] * 2, VOCAB, torch.device("cpu"), EOS, history=HISTORY))
    assert out.logprobs is None and out.logprob_token_ids is None


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _ops_for_batch(num_rows: int, num_seeded: int) -> int:
    rows = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, typical_p=0.95,
                           repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.2,
                           logit_bias={3: 1.0}, min_tokens=5, logprobs=3, bad_words=["x"],
                           seed=row if row < num_seeded else None)
            for row in range(num_rows)]
    for p in rows:   # bad_words as the input processor tokenizes them: bans 9 always, 5 after an output 4
        p._bad_words_token_ids = [[9], [4, 5]]
    tensors = build_sampling_tensors([make_state(p, outputs=[4, 4]) for p in rows], VOCAB,
                                     torch.device("cpu"), EOS, history=HISTORY)
    logits = random_logits(num_rows, seed=15)
    with _CountOps() as counter:
        Sampler()(logits, tensors)
    return counter.count


def test_hot_path_has_no_per_row_python_loop():
    """Every feature on: the number of tensor ops does not grow with the batch; each seeded
    row adds exactly two (a view of its row and its own exponential draw)."""
    base = _ops_for_batch(2, 0)
    assert _ops_for_batch(64, 0) == base
    assert _ops_for_batch(64, 5) == base + 2 * 5


def test_sampling_in_chunks_equals_one_pass(monkeypatch):
    """sampling_inputs.sample bounds the sampler's memory by sampling SAMPLER_CHUNK_ROWS rows at
    a time: the tokens, logprob tables and ranks are those of one pass over the batch."""
    from pagedserve.worker import sampling_inputs
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.8, seed=5, top_p=0.9),
              SamplingParams(temperature=0.0, logit_bias={11: 100.0}), SamplingParams(temperature=1.0, seed=9, top_k=5,
                                                                                        logprobs=4),
              SamplingParams(temperature=0.0, min_tokens=3), SamplingParams(temperature=0.7, seed=1, min_p=0.1)]
    logits = random_logits(len(params), seed=3)
    logits[4, EOS[0]] = 1e4   # masked by min_tokens
    results = []
    for chunk in (len(params), 4, 1):
        monkeypatch.setattr(sampling_inputs, "SAMPLER_CHUNK_ROWS", chunk)
        states = [make_state(p) for p in params]   # fresh generators: same draws each time
        results.append(sampling_inputs.sample(Sampler(), logits, states, VOCAB, torch.device("cpu"), EOS, history=HISTORY))
    one = results[0]
    assert one.token_ids[2].item() == 11 and one.token_ids[4].item() != EOS[0]
    for out in results[1:]:
        assert torch.equal(out.token_ids, one.token_ids)
        for row, k in ((0, 2), (3, 4)):   # rows asking logprobs read their rank and 1 + k columns
            assert out.sampled_ranks[row] == one.sampled_ranks[row]
            assert torch.equal(out.logprob_token_ids[row, :1 + k], one.logprob_token_ids[row, :1 + k])
            assert torch.equal(out.logprobs[row, :1 + k], one.logprobs[row, :1 + k])


def test_greedy_rows_are_sampled_in_larger_chunks(monkeypatch):
    """Greedy rows without logprobs (penalties, bias, min_tokens, bad words on) go
    GREEDY_CHUNK_ROWS at a time, others SAMPLER_CHUNK_ROWS; the ids equal one pass's."""
    from pagedserve.worker import sampling_inputs
    greedy = [SamplingParams(temperature=0.0, frequency_penalty=0.5, repetition_penalty=1.2),
              SamplingParams(temperature=0.0, logit_bias={11: 100.0}), SamplingParams(temperature=0.0, min_tokens=5),
              SamplingParams(temperature=0.0, presence_penalty=-2.0), SamplingParams(temperature=0.0)]
    greedy[1]._bad_words_token_ids = [[11]]   # the ban wins over the bias
    monkeypatch.setattr(sampling_inputs, "SAMPLER_CHUNK_ROWS", 1)
    monkeypatch.setattr(sampling_inputs, "GREEDY_CHUNK_ROWS", 2)
    assert sampling_inputs.chunk_rows([make_state(p) for p in greedy]) == 2
    assert sampling_inputs.chunk_rows([make_state(p) for p in greedy + [SamplingParams(temperature=0.5)]]) == 1
    assert sampling_inputs.chunk_rows([make_state(SamplingParams(temperature=0.0, logprobs=1))]) == 1
    calls = []
    real = Sampler.__call__
    monkeypatch.setattr(Sampler, "__call__", lambda self, x, t, b=None: calls.append(x.shape[0]) or real(self, x, t, b))
    logits = random_logits(len(greedy), seed=21)
    logits[2, EOS[0]] = 1e4   # masked by min_tokens
    states = [make_state(p, prompt=[1, 2, 3], outputs=[4, 4, 5]) for p in greedy]
    chunked = sampling_inputs.sample(Sampler(), logits, states, VOCAB, torch.device("cpu"), EOS, history=HISTORY)
    assert calls == [2, 2, 1]
    one = Sampler()(logits, build_sampling_tensors(states, VOCAB, torch.device("cpu"), EOS, history=HISTORY))
    assert torch.equal(chunked.token_ids, one.token_ids) and chunked.token_ids[1] != 11 and chunked.token_ids[2] != EOS[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_argmax_equals_torch_argmax(dtype):
    """The CPU argmax through numpy gives torch.argmax's ids: first maximum on ties, a NaN as
    the maximum, all -inf rows at 0, strided views, int64."""
    from pagedserve.layers.sampler import argmax_rows_host
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 1000, generator=g, dtype=dtype)
    x[1, [10, 500, 999]] = 50.0          # ties: first wins
    x[2, 7] = float("nan")
    x[2, 3] = float("nan")               # two NaNs: the first
    x[3] = float("-inf")
    x[4, :] = 1.5                         # all equal
    x[5, 999] = float("inf")
    for t in (x, x[:, ::3], x.t().contiguous().t(), x[:0]):
        got = argmax_rows_host(t)
        assert got.dtype == torch.int64
        assert torch.equal(got, t.argmax(dim=-1))
    assert argmax_rows_host(x)[1:6].tolist() == [10, 3, 0, 0, 999]
