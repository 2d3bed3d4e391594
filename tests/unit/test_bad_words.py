"""vLLM's bad_words: the runner's ban (exact token ids, through build_sampling_tensors and the
Sampler), the input processor's tokenization (each word as written and with a leading space,
vLLM's rule for keeping the second) and its errors, each naming bad_words."""
from __future__ import annotations

import pytest
import torch

from pagedserve.errors import ValidationError
from pagedserve.frontend.input_processor import MAX_BAD_WORD_SEQUENCES, InputProcessor
from pagedserve.layers.sampler import Sampler, apply_bias_and_min_tokens
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.input_batch import CachedRequestState
from pagedserve.worker.sampling_inputs import build_sampling_tensors

VOCAB = 64
EOS = (2,)
CPU = torch.device("cpu")
PROMPT = [1, 7, 10]   # ends with the first token of the sequence [10, 20]


def params_with(sequences: list[list[int]], **kwargs) -> SamplingParams:
    """SamplingParams as the input processor leaves them: bad_words tokenized to `sequences`."""
    params = SamplingParams(bad_words=["(tokenized below)"], **kwargs)
    params._bad_words_token_ids = sequences
    return params


def state_after(params: SamplingParams, outputs: list[int], prompt: list[int] = PROMPT) -> CachedRequestState:
    state = CachedRequestState("r", list(prompt), len(prompt), params, [0], len(prompt))
    for token in outputs:
        state.append_output(token)
    return state


def banned_by_step(params: SamplingParams, outputs: list[int]) -> set[int]:
    """The tokens set to -inf in the row after `outputs` (and no other change to the row)."""
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(len(outputs)))
    processed = apply_bias_and_min_tokens(logits.clone(), build_sampling_tensors(
        [state_after(params, outputs)], VOCAB, CPU, EOS))
    kept = ~torch.isneginf(processed)
    assert torch.equal(processed[kept], logits[kept])
    return set(torch.isneginf(processed[0]).nonzero().flatten().tolist())


def test_single_token_banned_always_and_longer_sequences_only_after_their_prefix():
    """[5]: banned at every step. [10, 20]: 20 banned right after an output 10, never after the
    prompt's 10 (vLLM matches the output only) nor once another token followed the 10.
    [30, 31, 32]: 32 banned only after the outputs 30, 31."""
    params = params_with([[5], [10, 20], [30, 31, 32]], temperature=0.0)
    assert banned_by_step(params, []) == {5}                  # the prompt ends with 10: 20 stays allowed
    assert banned_by_step(params, [10]) == {5, 20}
    assert banned_by_step(params, [10, 3]) == {5}
    assert banned_by_step(params, [3, 10]) == {5, 20}
    assert banned_by_step(params, [30]) == {5}
    assert banned_by_step(params, [30, 31]) == {5, 32}
    assert banned_by_step(params, [9, 30, 31]) == {5, 32}
    assert banned_by_step(params, [31, 30]) == {5}
    assert banned_by_step(params, [30, 10]) == {5, 20}


def test_greedy_generation_never_completes_a_bad_word():
    """A fake model's logits step by step (5 always the favourite): greedy never samples 5, and
    20 only where it does not follow a sampled 10; a row without bad words beside it keeps
    the plain argmax (5) at every step."""
    params = params_with([[5], [10, 20]], temperature=0.0)
    banned_row, free_row = state_after(params, []), state_after(SamplingParams(temperature=0.0), [])
    favourites = [{10: 8.0}, {20: 8.0, 12: 7.0}, {20: 8.0, 12: 7.0}, {10: 8.0}, {20: 8.0, 13: 1.0}]
    for scores in favourites:
        logits = torch.zeros(2, VOCAB)
        logits[:, 5] = 9.0
        for token, score in scores.items():
            logits[:, token] = score
        tokens = Sampler()(logits, build_sampling_tensors([banned_row, free_row], VOCAB, CPU, EOS)).token_ids
        assert tokens[1].item() == 5
        banned_row.append_output(tokens[0].item())
    assert banned_row.token_ids[len(PROMPT):] == [10, 12, 20, 10, 13]


def test_sampled_rows_never_draw_a_banned_token():
    params = params_with([[5], [10, 20]], temperature=1.0, seed=3)
    logits = torch.zeros(1, VOCAB)
    logits[0, 5] = logits[0, 20] = 6.0   # nearly all the mass
    draws = []
    state = state_after(params, [10])
    state.generator = torch.Generator().manual_seed(3)
    for _ in range(200):
        draws.append(Sampler()(logits, build_sampling_tensors([state], VOCAB, CPU, EOS)).token_ids.item())
    assert 5 not in draws and 20 not in draws


def test_bad_words_leave_the_fast_path():
    """A request with bad words is never plain greedy (the one-argmax path ignores bans), and
    keeps no output counts (penalties only)."""
    single, multi = params_with([[5], [6]], temperature=0.0), params_with([[5], [10, 20]], temperature=0.0)
    assert not single.is_plain_greedy and not multi.is_plain_greedy
    assert SamplingParams(temperature=0.0).is_plain_greedy
    assert not state_after(multi, []).counts_outputs


def pending_state(params: SamplingParams, outputs: list[int], sampled_row: int) -> CachedRequestState:
    """A row after `outputs` and one more output still on the device (async scheduling's -1
    placeholder, in row `sampled_row` of the last launched step's sampled ids)."""
    state = state_after(params, outputs)
    state.pending_pos = len(state.token_ids)
    state.token_ids.append(-1)
    state.sampled_row = sampled_row
    return state


def banned_while_pending(params: SamplingParams, outputs: list[int], pending_token: int) -> set[int]:
    """banned_by_step's set for a row whose latest output, `pending_token`, is still a placeholder:
    the sampler reads it from the previous step's ids on the device (row 1 of them here)."""
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(len(outputs)))
    prev_sampled = torch.tensor([pending_token + 1, pending_token, pending_token + 2])
    processed = apply_bias_and_min_tokens(logits.clone(), build_sampling_tensors(
        [pending_state(params, outputs, 1)], VOCAB, CPU, EOS, prev_sampled))
    kept = ~torch.isneginf(processed)
    assert torch.equal(processed[kept], logits[kept])
    return set(torch.isneginf(processed[0]).nonzero().flatten().tolist())


def test_bans_that_wait_on_a_placeholder_apply_only_where_its_token_matches():
    """With async scheduling the row's latest output is on the device when it is sampled: the
    bans equal those of the same history fully on the host, for every pending token."""
    params = params_with([[5], [10, 20], [30, 31, 32], [30, 33, 34], [7, 20]], temperature=0.0)
    histories = [[10], [3, 10], [7], [30, 31], [30, 33], [31, 31], [9, 30, 31], [30, 10], [10, 3], [33]]
    for history in histories:
        *outputs, last = history
        assert banned_while_pending(params, outputs, last) == banned_by_step(params, history), history
    # the first output pending: the prompt's 10 (PROMPT ends with it) still bans nothing
    assert banned_while_pending(params, [], 3) == {5}
    assert banned_while_pending(params, [], 10) == {5, 20}


def test_a_placeholder_without_the_previous_ids_is_an_error():
    params = params_with([[10, 20]], temperature=0.0)
    with pytest.raises(RuntimeError, match="placeholder"):
        build_sampling_tensors([pending_state(params, [10], 0)], VOCAB, CPU, EOS)


class FakeTokenizer:
    """encode() from a table; an unknown text is one token per character (ids 40 + ord % 20)."""

    TABLE = {"Paris": [11], " Paris": [12], "answer is": [13, 14], " answer is": [15, 14],
             "foo": [16], " foo": [16, 17], "bar": [18], " bar": [18], "big": [99], " big": [99]}

    def get_vocab(self) -> dict[str, int]:
        return {"x" * 8: 0}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        if text in self.TABLE:
            return list(self.TABLE[text])
        return [40 + ord(ch) % 20 for ch in text.strip()]


def processor(tokenizer=FakeTokenizer()) -> InputProcessor:
    return InputProcessor(tokenizer, vocab_size=VOCAB, max_model_len=128, eos_token_ids=EOS)


def test_tokenization_follows_vllms_rule():
    """Each word stripped of leading spaces; its leading-space form kept only when it has as
    many tokens and another first token (vLLM's update_from_tokenizer)."""
    ids = processor().bad_words_token_ids
    assert ids(["Paris"]) == [[11], [12]]
    assert ids(["  Paris"]) == [[11], [12]]          # leading spaces stripped first
    assert ids(["answer is"]) == [[13, 14], [15, 14]]
    assert ids(["foo"]) == [[16]]                   # " foo" has another length: not kept
    assert ids(["bar"]) == [[18]]                   # " bar" starts with the same token: not kept


def test_make_requests_tokenizes_on_a_copy():
    proc = processor()
    params = SamplingParams(bad_words=["Paris", "answer is"], temperature=0.0)
    prompt = proc.process_prompt([1, 2, 3])
    request, _ = proc.make_requests("r", prompt, params)
    assert request.sampling_params.bad_words_token_ids == [[11], [12], [13, 14], [15, 14]]
    assert params.bad_words_token_ids is None        # the caller's object is untouched
    plain, _ = proc.make_requests("s", prompt, SamplingParams())
    assert plain.sampling_params.bad_words_token_ids is None


@pytest.mark.parametrize("words,tokenizer", [
    ([""], FakeTokenizer()), (["   "], FakeTokenizer()),                # no tokens
    (["big"], FakeTokenizer()),                                           # id 99 past the vocabulary
    ([f"w{i}" for i in range(MAX_BAD_WORD_SEQUENCES + 1)], FakeTokenizer()),
    (["Paris"], None),                                                    # skip_tokenizer_init
])
def test_bad_words_errors_name_bad_words(words, tokenizer):
    proc = processor(tokenizer)
    with pytest.raises(ValidationError) as info:
        proc.make_requests("r", proc.process_prompt([1, 2, 3]), SamplingParams(bad_words=words))
    assert info.value.param == "bad_words"


@pytest.mark.parametrize("value", ["Paris", [1], ["Paris", None], {"Paris": 1}, 5])
def test_bad_words_must_be_a_list_of_strings(value):
    with pytest.raises(ValidationError) as info:
        SamplingParams(bad_words=value)
    assert info.value.param == "bad_words"


def test_bad_words_normalisation_as_vllm():
    assert SamplingParams().bad_words == [] and SamplingParams(bad_words=None).bad_words == []
    assert SamplingParams(bad_words=("a", "b", "a")).bad_words == ["a", "b"]


def test_words_longer_than_the_token_limit_can_hold_are_refused_untokenized() -> None:
    """Words longer together than MAX_BAD_WORD_TOKENS tokens of the vocabulary's longest entry can
    hold are refused from their length, before the tokenizer sees them (a 15 MB word held an input
    thread ~20 s, twice); a long word under that bound is still tokenized and counted."""
    from pagedserve.frontend.input_processor import MAX_BAD_WORD_TOKENS, InputProcessor

    class Tokenizer:
        calls = 0

        def get_vocab(self):
            return {"a": 0, "bb": 1, "ccc": 2}

        def encode(self, text, add_special_tokens=False):
            Tokenizer.calls += 1
            return [0] * len(text)

    processor = InputProcessor(Tokenizer(), 3, 64, (2,))
    assert processor.longest_token_chars == 3
    with pytest.raises(ValidationError, match="characters long") as refused:
        processor.bad_words_token_ids(["x" * (3 * MAX_BAD_WORD_TOKENS)])
    assert refused.value.param == "bad_words" and Tokenizer.calls == 0
    with pytest.raises(ValidationError, match="token sequences or"):   # under the bound: tokenized, then counted
        processor.bad_words_token_ids(["x" * 1100])
    assert Tokenizer.calls > 0
