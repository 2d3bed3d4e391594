"""The penalties (repetition, frequency, presence) against transformers and their formulas;
the runner's OutputHistory (penalised rows' outputs on the device, appended by the step that
samples them); the sparse form applied to the seen (row, token) pairs against the dense passes."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from pagedserve.layers.sampler import apply_penalties
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.input_batch import CachedRequestState
from pagedserve.worker.output_history import OutputHistory
from pagedserve.worker.sampling_inputs import build_sampling_tensors
from tests.unit.test_sampler import EOS, HISTORY, VOCAB, make_state, random_logits


def test_repetition_penalty_matches_transformers():
    prompts = [[5, 9, 9, 300], [1, 2], [40, 41, 42, 43, 44], [8]]
    outputs = [[11, 5, 12], [], [44, 44, 100], [9, 9, 9]]
    penalties = [1.3, 1.7, 0.8, 1.0]
    states = [make_state(SamplingParams(repetition_penalty=pen), prompt, out)
              for pen, prompt, out in zip(penalties, prompts, outputs)]
    logits = random_logits(len(states), seed=4)
    # seen tokens on both sides of zero, so both branches (divide / multiply) are taken
    logits[0, 5], logits[0, 9], logits[2, 44], logits[2, 40] = 2.5, -1.5, -3.0, 4.0
    tensors = build_sampling_tensors(states, VOCAB, torch.device("cpu"), EOS, history=HISTORY)
    ours = apply_penalties(logits, tensors)
    for row, (pen, prompt, out) in enumerate(zip(penalties, prompts, outputs)):
        input_ids = torch.tensor([prompt + out])
        theirs = RepetitionPenaltyLogitsProcessor(pen)(input_ids, logits[row:row + 1].clone())
        torch.testing.assert_close(ours[row:row + 1], theirs, rtol=0, atol=0)
    assert ours[0, 5].item() == pytest.approx(2.5 / 1.3) and ours[0, 9].item() == pytest.approx(-1.5 * 1.3)
    assert ours[2, 44].item() == pytest.approx(-3.0 * 0.8) and ours[2, 40].item() == pytest.approx(4.0 / 0.8)
    assert torch.equal(ours[3], logits[3])
    unseen = [t for t in range(VOCAB) if t not in set(prompts[0] + outputs[0])]
    assert torch.equal(ours[0, unseen], logits[0, unseen])


def test_frequency_and_presence_penalties_formula():
    outputs = [[3, 3, 3, 10, 11], [3], [], [50, 50, 51]]
    params = [SamplingParams(frequency_penalty=0.5), SamplingParams(presence_penalty=1.5),
              SamplingParams(frequency_penalty=2.0, presence_penalty=-1.0),
              SamplingParams(frequency_penalty=-0.7, presence_penalty=0.4)]
    states = [make_state(p, prompt=[3, 50, 60], outputs=out) for p, out in zip(params, outputs)]
    logits = random_logits(len(states), seed=5)
    ours = apply_penalties(logits, build_sampling_tensors(states, VOCAB, torch.device("cpu"), EOS, history=HISTORY))
    expected = logits.clone()
    for row, (p, out) in enumerate(zip(params, outputs)):
        for token in set(out):   # prompt tokens are not penalized by frequency/presence
            expected[row, token] -= p.frequency_penalty * out.count(token) + p.presence_penalty
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert ours[0, 3].item() == pytest.approx(logits[0, 3].item() - 1.5)
    assert ours[1, 3].item() == pytest.approx(logits[1, 3].item() - 1.5)
    assert torch.equal(ours[2], logits[2])
    assert ours[3, 50].item() == pytest.approx(logits[3, 50].item() + 1.4 - 0.4)
    assert ours[0, 60].item() == logits[0, 60].item()


def test_penalties_count_a_placeholder_token_from_the_device():
    """With async scheduling a row's latest output is still a -1 placeholder on the host when the
    row is sampled: the penalties count the outputs in the runner's OutputHistory, where each
    step's sampled ids were appended on the device, and equal those of the same outputs known on
    the host."""
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), SamplingParams(repetition_penalty=1.4),
              SamplingParams(frequency_penalty=1.0), SamplingParams(temperature=0.0)]
    histories = [[3, 3, 10], [60, 11], [44], [44, 45]]   # the last of each sampled by the step in flight
    pending = [make_state(p, prompt=[3, 50, 60], outputs=out[:-1]) for p, out in zip(params, histories)]
    HISTORY.append(pending, torch.tensor([out[-1] for out in histories]))
    for state in pending:
        state.pending_pos, state.sampled_row = len(state.token_ids), 0
        state.token_ids.append(-1)
    host = [make_state(p, prompt=[3, 50, 60], outputs=out) for p, out in zip(params, histories)]
    logits = random_logits(len(params), seed=6)
    logits[1, 11], logits[2, 44] = 2.0, 1.5
    cpu = torch.device("cpu")
    ours = apply_penalties(logits, build_sampling_tensors(pending, VOCAB, cpu, EOS, history=HISTORY))
    assert torch.equal(ours, apply_penalties(logits, build_sampling_tensors(host, VOCAB, cpu, EOS, history=HISTORY)))
    assert ours[0, 10].item() == pytest.approx(logits[0, 10].item() - 0.75)
    assert ours[1, 11].item() == pytest.approx(2.0 / 1.4) and ours[2, 44].item() == pytest.approx(0.5)
    assert torch.equal(ours[3], logits[3])
    assert pending[3].history_row == -1   # no penalties: no row kept


def test_output_history_rows_are_reused_and_grow():
    """Rows freed by finished requests are taken again; a row grows past its width; a fork
    copies its parent's outputs, the one still on the device too."""
    history = OutputHistory(torch.device("cpu"))
    params = SamplingParams(frequency_penalty=1.0)
    states = [CachedRequestState(str(i), [1, 2, 9, 9], 2, params, [0], 2) for i in range(20)]
    for state in states:
        history.add(state)
    assert sorted(s.history_row for s in states) == list(range(20)) and history.ids.shape[0] == 32
    history.remove(states[4])
    late = CachedRequestState("late", [1, 2], 2, params, [0], 2)
    history.add(late)
    assert late.history_row == 4 and states[4].history_row == -1
    for step in range(300):
        history.append([late, states[0]], torch.tensor([step % 7, 5]))
    assert late.history_len == 300 and history.ids.shape[1] >= 300
    child = CachedRequestState("child", [1, 2, -1], 2, params, [0], 2)
    history.fork(child, late)
    rows, tokens, in_output = history.entries([0, 2], [child, states[0]])
    assert in_output.all()   # no repetition penalty: no prompt ids kept
    counts = torch.zeros(3, 16, dtype=torch.int64).index_put_((rows, tokens), torch.ones_like(rows), accumulate=True)
    assert counts[0, :7].tolist() == [43, 43, 43, 43, 43, 43, 42] and counts[0, 7:].sum() == 0
    assert counts[1].sum() == 0 and counts[2, 9] == 2 and counts[2, 5] == 300
    assert rows.tolist() == [0] * 300 + [2] * 302 and tokens[300:302].tolist() == [9, 9]


def test_output_history_holds_the_prompt_where_a_repetition_penalty_reads_it():
    """A repetition-penalised row holds its prompt's ids, then its outputs (the step's appends
    after them); entries mark which are outputs. Its fork keeps both."""
    history = OutputHistory(torch.device("cpu"))
    rep = CachedRequestState("rep", [7, 8, 7, 30, 31], 3, SamplingParams(repetition_penalty=1.3), [0], 3)
    freq = CachedRequestState("freq", [7, 8, 30], 2, SamplingParams(frequency_penalty=1.0), [0], 2)
    for state in (rep, freq):
        history.add(state)
    assert (rep.history_prompt, rep.history_len, freq.history_prompt, freq.history_len) == (3, 5, 0, 1)
    history.append([freq, rep], torch.tensor([40, 41]))
    child = CachedRequestState("child", [7, 8, 7, 30, 31, -1], 3, rep.sampling_params, [0], 3)
    history.fork(child, rep)
    rows, tokens, in_output = history.entries([5, 0, 2], [rep, freq, child])
    assert rows.tolist() == [5] * 6 + [0] * 2 + [2] * 6
    assert tokens.tolist() == [7, 8, 7, 30, 31, 41, 30, 40, 7, 8, 7, 30, 31, 41]
    assert in_output.tolist() == [False] * 3 + [True] * 5 + [False] * 3 + [True] * 3


def dense_penalties(logits: torch.Tensor, states: list[CachedRequestState]) -> torch.Tensor:
    """The penalties as [rows, vocab] passes (the sampler's form before session 44), from the
    states' host token lists: the reference the sparse form must equal bit for bit."""
    rows = len(states)
    counts = torch.zeros(rows, VOCAB, dtype=torch.int32)
    prompt = torch.zeros(rows, VOCAB, dtype=torch.bool)
    for row, state in enumerate(states):
        for token in state.token_ids[state.num_prompt_tokens:]:
            counts[row, token] += 1
        if state.sampling_params.repetition_penalty != 1.0:
            prompt[row, state.token_ids[:state.num_prompt_tokens]] = True
    rep = torch.tensor([s.sampling_params.repetition_penalty for s in states])
    freq = torch.tensor([s.sampling_params.frequency_penalty for s in states])
    pres = torch.tensor([s.sampling_params.presence_penalty for s in states])
    seen = prompt | (counts > 0)
    penalty = rep[:, None].expand_as(logits)
    logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    logits = logits - freq[:, None] * counts
    return logits - pres[:, None] * (counts > 0)


def test_sparse_penalties_equal_the_dense_passes_bit_for_bit():
    """Random rows (some without penalties, repeated tokens, prompt and output overlapping,
    empty outputs): the sorted-entries form changes exactly the dense form's values."""
    rng = torch.Generator().manual_seed(9)
    for trial in range(20):
        states = []
        for row in range(7):
            kind = int(torch.randint(0, 5, (1,), generator=rng))
            params = [SamplingParams(), SamplingParams(repetition_penalty=1.35),
                      SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4),
                      SamplingParams(repetition_penalty=0.8, frequency_penalty=-1.1),
                      SamplingParams(presence_penalty=1.9)][kind]
            high = 12 if trial % 2 else VOCAB   # few distinct tokens: long runs
            prompt = torch.randint(0, high, (int(torch.randint(1, 30, (1,), generator=rng)),), generator=rng).tolist()
            outputs = torch.randint(0, high, (int(torch.randint(0, 40, (1,), generator=rng)),), generator=rng).tolist()
            states.append(make_state(params, prompt=prompt, outputs=outputs))
        logits = random_logits(len(states), seed=100 + trial)
        tensors = build_sampling_tensors(states, VOCAB, torch.device("cpu"), EOS, history=HISTORY)
        assert torch.equal(apply_penalties(logits.clone(), tensors), dense_penalties(logits.clone(), states)), trial


def test_penalties_combined_order_repetition_then_frequency_presence():
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    state = make_state(p, prompt=[4], outputs=[6, 6])
    logits = torch.zeros(1, VOCAB)
    logits[0, 4], logits[0, 6], logits[0, 8] = 3.0, -1.0, 1.0
    ours = apply_penalties(logits, build_sampling_tensors([state], VOCAB, torch.device("cpu"), EOS, history=HISTORY))
    assert ours[0, 4].item() == 1.5                      # prompt: repetition only
    assert ours[0, 6].item() == -2.0 - 2 * 0.5 - 0.25     # output: repetition, then -freq*count - presence
    assert ours[0, 8].item() == 1.0
