"""IncrementalDetokenizer against the tokenizers' own full decode: streamed deltas add up to
`tokenizer.decode(ids)`, characters split over byte tokens come out whole, stop strings cut
the text (spanning tokens too) and streaming holds back a possible stop-string prefix."""
from __future__ import annotations

import os
import random

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from pagedserve.frontend.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from pagedserve.models.default_model import default_model_path

ASCII_WORDS = ("the quick brown fox jumps over a lazy dog hello world stream token decode "
               "space answer is forty two").split()
CJK = "世界你好中文字符测试流式解码"
EMOJI = "🎉😀🚀👍🦀"
OTHER = ["wörld", "café", "naïve", "42", ",", ".", "!", "\n", "  ", "(x)"]


def random_text(rng: random.Random, num_pieces: int) -> str:
    pieces = []
    for _ in range(num_pieces):
        kind = rng.random()
        if kind < 0.5:
            pieces.append(" " + rng.choice(ASCII_WORDS))
        elif kind < 0.7:
            pieces.append("".join(rng.choice(CJK) for _ in range(rng.randint(1, 3))))
        elif kind < 0.85:
            pieces.append(rng.choice(["", " "]) + rng.choice(EMOJI))
        else:
            pieces.append(rng.choice(OTHER))
    return "".join(pieces).lstrip(" ")


def stream(detokenizer: IncrementalDetokenizer, output_ids: list[int],
           chunk_sizes: list[int] | None = None) -> tuple[list[str], str | None]:
    """Feed `output_ids` (one id per update, or the given chunk sizes) and collect the
    streamed deltas; the last delta is the release at finish."""
    chunk_sizes = chunk_sizes or [1] * len(output_ids)
    deltas: list[str] = []
    stop_reason = None
    start = 0
    for size in chunk_sizes:
        stop_reason = detokenizer.update(output_ids[start:start + size], stop_terminated=False)
        start += size
        deltas.append(detokenizer.get_next_output_text(finished=stop_reason is not None,
                                                       delta=True))
        if stop_reason is not None or start >= len(output_ids):
            break
    deltas.append(detokenizer.get_next_output_text(finished=True, delta=True))
    return deltas, stop_reason


def random_chunks(rng: random.Random, total: int) -> list[int]:
    sizes = []
    while sum(sizes) < total:
        sizes.append(rng.randint(1, 4))
    return sizes


# ---------------------------------------------------------------- tokenizers under test


@pytest.fixture(scope="module")
def default_tokenizer() -> PreTrainedTokenizerBase:
    path = default_model_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


class SentencePieceLlamaTokenizer(SentencePieceBackend):
    """A slow (pure Python) Llama-style tokenizer: pieces decode through the SentencePiece
    model, so byte-fallback pieces become UTF-8 (transformers 4's slow LlamaTokenizer did
    this; transformers 5's generic SentencePieceBackend only swaps '▁' for ' ')."""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        text, pieces = "", []
        for token in tokens:
            if token in self.all_special_tokens:
                text += self.sp_model.decode_pieces(pieces) + token
                pieces = []
            else:
                pieces.append(token)
        return text + self.sp_model.decode_pieces(pieces)


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny BPE model with byte fallback; CJK and emoji are too rare to get pieces."""
    rng = random.Random(1)
    lines = [" ".join(rng.choice(ASCII_WORDS) for _ in range(10)) for _ in range(400)]
    lines[::40] = [line + " 世界 🎉" for line in lines[::40]]
    model_dir = tmp_path_factory.mktemp("sentencepiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(model_dir / "tokenizer"),
        vocab_size=340, model_type="bpe", byte_fallback=True, character_coverage=0.98,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return str(model_dir)


@pytest.fixture(scope="module")
def sentencepiece_tokenizers(sentencepiece_dir: str) -> dict[str, PreTrainedTokenizerBase]:
    model_file = os.path.join(sentencepiece_dir, "tokenizer.model")
    return {
        "fast": LlamaTokenizer.from_pretrained(sentencepiece_dir),  # converted from the .model
        "slow": SentencePieceLlamaTokenizer(vocab_file=model_file, unk_token="<unk>",
                                            bos_token="<s>", eos_token="</s>"),
    }


# ---------------------------------------------------------------- decode equality


def test_default_tokenizer_stream_matches_full_decode(default_tokenizer):
    tok = default_tokenizer
    rng = random.Random(0)
    special_ids = [tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens]
    for case in range(60):
        output_ids = tok.encode(random_text(rng, rng.randint(3, 25)), add_special_tokens=False)
        for _ in range(rng.randint(0, 2)):
            output_ids.insert(rng.randrange(len(output_ids) + 1), rng.choice(special_ids))
        prompt_ids = [] if case % 3 == 0 else tok.encode(random_text(rng, 8))
        detok = IncrementalDetokenizer(tok, prompt_ids)
        assert detok.uses_decode_stream
        chunks = None if case % 2 else random_chunks(rng, len(output_ids))
        deltas, stop_reason = stream(detok, output_ids, chunks)
        expected = tok.decode(output_ids, skip_special_tokens=True)
        assert stop_reason is None
        assert "".join(deltas) == expected == detok.output_text
        assert REPLACEMENT_CHAR not in expected
        assert not any(REPLACEMENT_CHAR in delta for delta in deltas)


@pytest.mark.parametrize("skip_special_tokens,spaces_between_special_tokens,stream_path", [
    (True, True, True), (False, True, True), (False, False, False)])
def test_default_tokenizer_random_ids(default_tokenizer, skip_special_tokens,
                                      spaces_between_special_tokens, stream_path):
    """Random ids; every other sequence draws 60% of its ids from the byte pieces of
    CJK/emoji text, so characters are split and some bytes are invalid UTF-8. Without
    spaces between special tokens the offsets path runs; it must meet the same decode.
    A U+FFFD inside the full decode is real (and streamed); bytes left unfinished at the
    end stay held back, so the stream is then a prefix of the full decode."""
    tok = default_tokenizer
    rng = random.Random(1)
    byte_piece_ids = sorted(set(tok.encode(CJK + EMOJI + "".join(OTHER))))
    counts = {"clean": 0, "invalid inside": 0, "unfinished at end": 0}
    for case in range(120):
        share = 0.6 if case % 2 else 0.0
        output_ids = [rng.choice(byte_piece_ids) if rng.random() < share else rng.randrange(len(tok))
                      for _ in range(rng.randint(1, 20))]
        detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip_special_tokens,
                                       spaces_between_special_tokens=spaces_between_special_tokens)
        assert detok.uses_decode_stream == stream_path
        streamed = "".join(stream(detok, output_ids)[0])
        expected = tok.decode(output_ids, skip_special_tokens=skip_special_tokens)
        if REPLACEMENT_CHAR not in expected:
            counts["clean"] += 1
            assert streamed == expected
            assert REPLACEMENT_CHAR not in streamed
        elif not expected.endswith(REPLACEMENT_CHAR):
            counts["invalid inside"] += 1
            assert streamed == expected
        else:
            counts["unfinished at end"] += 1
            assert expected.startswith(streamed) and len(streamed) < len(expected)
    assert min(counts.values()) >= 15, counts  # every branch above really ran


@pytest.mark.parametrize("kind", ["fast", "slow"])
def test_sentencepiece_stream_matches_full_decode(sentencepiece_tokenizers, kind):
    tok = sentencepiece_tokenizers[kind]
    rng = random.Random(2)
    for case in range(40):
        output_ids = tok.encode(random_text(rng, rng.randint(2, 15)), add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, [tok.bos_token_id])
        assert detok.uses_decode_stream == (kind == "fast")
        chunks = None if case % 2 else random_chunks(rng, len(output_ids))
        deltas, _ = stream(detok, output_ids, chunks)
        expected = tok.decode(output_ids, skip_special_tokens=True)
        assert REPLACEMENT_CHAR not in expected
        assert "".join(deltas) == expected
        assert not any(REPLACEMENT_CHAR in delta for delta in deltas)


@pytest.mark.parametrize("kind", ["fast", "slow"])
def test_sentencepiece_leading_space_follows_prompt(sentencepiece_tokenizers, kind):
    """'▁world' after a prompt streams as ' world'; as the first token of a text, 'world'."""
    tok = sentencepiece_tokenizers[kind]
    prompt_ids = tok.encode("hello", add_special_tokens=False)
    output_ids = tok.encode("world fox", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(output_ids)[0].startswith("▁")
    after_prompt = IncrementalDetokenizer(tok, [tok.bos_token_id] + prompt_ids)
    assert "".join(stream(after_prompt, output_ids)[0]) == " world fox"
    no_prompt = IncrementalDetokenizer(tok, [tok.bos_token_id])
    assert "".join(stream(no_prompt, output_ids)[0]) == "world fox"
    full = tok.decode(prompt_ids + output_ids, skip_special_tokens=True)
    assert full == "hello world fox"


# ---------------------------------------------------------------- UTF-8 safety


@pytest.mark.parametrize("kind", ["fast", "slow"])
def test_sentencepiece_byte_fallback_characters_come_out_whole(sentencepiece_tokenizers, kind):
    tok = sentencepiece_tokenizers[kind]
    output_ids = tok.encode("fox 世界🎉 dog", add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(output_ids)
    assert pieces.count("<0xE4>") == 1 and pieces.count("<0xF0>") == 1  # 世 and 🎉 are bytes
    detok = IncrementalDetokenizer(tok, [tok.bos_token_id])
    per_token = [detok.update([token_id], stop_terminated=False) or
                 detok.get_next_output_text(finished=False, delta=True) for token_id in output_ids]
    assert [delta for delta in per_token if delta] == ["fox", " ", "世", "界", "🎉", " dog"]
    # 3 + 3 + 4 byte pieces: each character appears on its last byte, nothing before.
    assert per_token[pieces.index("<0xE4>"):pieces.index("<0xF0>") + 4] == [
        "", "", "世", "", "", "界", "", "", "", "🎉"]


def test_default_tokenizer_emoji_and_cjk_come_out_whole(default_tokenizer):
    tok = default_tokenizer
    text = "Hi 世界🎉🦀 ok"
    output_ids = tok.encode(text, add_special_tokens=False)
    assert len(output_ids) > len(text.split())  # the characters really are split
    detok = IncrementalDetokenizer(tok, tok.encode("Say:"))
    per_token = []
    for token_id in output_ids:
        detok.update([token_id], stop_terminated=False)
        per_token.append(detok.get_next_output_text(finished=False, delta=True))
    assert "".join(per_token) == text
    assert [d for d in per_token if d] == ["Hi", " ", "世", "界", "🎉", "🦀", " ok"]


@pytest.mark.parametrize("skip_special_tokens,spaces_between_special_tokens",
                         [(True, True), (False, False)])
def test_character_split_between_prompt_and_output(default_tokenizer, skip_special_tokens,
                                                   spaces_between_special_tokens):
    """A prompt of raw ids may end inside a character; the output completes it and the
    character comes out whole, at the start of the output, on either decoding path."""
    tok = default_tokenizer
    ids = tok.encode("Hi 世 ok", add_special_tokens=False)
    assert REPLACEMENT_CHAR in tok.decode(ids[:-2])  # the cut really is inside 世
    detok = IncrementalDetokenizer(tok, ids[:-2], skip_special_tokens=skip_special_tokens,
                                   spaces_between_special_tokens=spaces_between_special_tokens)
    assert "".join(stream(detok, ids[-2:])[0]) == "世 ok"


def test_invalid_token_ids_add_no_text(default_tokenizer):
    detok = IncrementalDetokenizer(default_tokenizer, [])
    assert detok.update([-1, 10**9], stop_terminated=False) is None
    assert detok.update(default_tokenizer.encode("fine"), stop_terminated=False) is None
    assert detok.output_text == "fine"


# ---------------------------------------------------------------- stop strings


def test_stop_string_spanning_tokens(default_tokenizer):
    tok = default_tokenizer
    output_ids = tok.encode("The answer is 42 and more text", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(output_ids)[2:4] == ["Ġis", "Ġ"]  # "is 4" spans tokens
    for include, expected in [(False, "The answer "), (True, "The answer is 4")]:
        detok = IncrementalDetokenizer(tok, [], stop=["is 4", "more"],
                                       include_stop_str_in_output=include)
        deltas, stop_reason = stream(detok, output_ids)
        assert stop_reason == "is 4"
        assert detok.output_text == "".join(deltas) == expected
        assert detok.output_token_ids == output_ids[:len(detok.output_token_ids)]


def test_earliest_stop_string_wins_within_one_update(default_tokenizer):
    tok = default_tokenizer
    output_ids = tok.encode("alpha beta gamma delta", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["delta", "beta", "gamma"])
    assert detok.update(output_ids, stop_terminated=False) == "beta"
    assert detok.output_text == "alpha "
    assert detok.get_next_output_text(finished=True, delta=False) == "alpha "


def test_hold_back_of_possible_stop_string(default_tokenizer):
    tok = default_tokenizer
    text = "We say Hell yes, then Hello! and bye"
    output_ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["Hello!"])
    assert detok.stop_buffer_length == 5
    streamed, stop_reason, saw_held_prefix = "", None, False
    for token_id in output_ids:
        stop_reason = detok.update([token_id], stop_terminated=False)
        streamed += detok.get_next_output_text(finished=stop_reason is not None, delta=True)
        if stop_reason is not None:
            break
        assert streamed == detok.output_text[:-5]
        assert detok.get_next_output_text(finished=False, delta=False) == streamed
        if detok.output_text.endswith(" Hell"):  # a prefix of the stop string: held back
            saw_held_prefix = True
            assert "Hell" not in streamed
        if detok.output_text.endswith(" yes,"):  # decided: not the stop string, released
            assert streamed == "We say Hell"
    assert saw_held_prefix
    assert stop_reason == "Hello!"
    assert streamed == detok.output_text == "We say Hell yes, then "
    assert detok.get_next_output_text(finished=True, delta=True) == ""

    keep = IncrementalDetokenizer(tok, [], stop=["Hello!"], include_stop_str_in_output=True)
    assert keep.stop_buffer_length == 0
    deltas, stop_reason = stream(keep, output_ids)
    assert stop_reason == "Hello!"
    assert "".join(deltas) == "We say Hell yes, then Hello!"


def test_unfinished_text_is_released_at_finish(default_tokenizer):
    tok = default_tokenizer
    detok = IncrementalDetokenizer(tok, [], stop=["STOP NOW"])
    assert detok.update(tok.encode("abc STOP", add_special_tokens=False), False) is None
    assert detok.get_next_output_text(finished=False, delta=True) == "a"  # 8 chars, 7 held
    assert detok.get_next_output_text(finished=False, delta=True) == ""
    assert detok.get_next_output_text(finished=False, delta=False) == "a"
    assert detok.get_next_output_text(finished=True, delta=True) == "bc STOP"
    assert detok.get_next_output_text(finished=True, delta=True) == ""
    assert detok.get_next_output_text(finished=True, delta=False) == "abc STOP"


def test_stop_token_text(default_tokenizer):
    tok = default_tokenizer
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    body = tok.encode("Done.", add_special_tokens=False)
    cases = [(True, False, "Done."), (False, False, "Done."), (False, True, "Done.<|im_end|>"),
             (True, True, "Done.")]
    for skip_special_tokens, include, expected in cases:
        detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip_special_tokens,
                                       include_stop_str_in_output=include)
        assert detok.update(body + [eos_id], stop_terminated=True) is None
        assert detok.get_next_output_text(finished=True, delta=True) == expected
        assert detok.output_token_ids == body + [eos_id]
    # A stop string before the stop token in the same update is the reason.
    detok = IncrementalDetokenizer(tok, [], stop=["one."])
    assert detok.update(tok.encode("Done.", add_special_tokens=False) + [eos_id], True) == "one."
    assert detok.output_text == "D"
