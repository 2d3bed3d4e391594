"""A text prompt that cannot fit max_model_len is refused before it is tokenized whole
(prompt_bound.PromptLengthBound): from its length where the tokenizer proves every token
covers at most its longest vocabulary entry, or from a bounded prefix's tokens. A 15 MB prompt
held an input thread 13-33 s to reach the same 400. Neither bound ever refuses a text that fits:
texts built to tokenize just under the limit (spaces, accents, one huge word, CJK, long runs
of punctuation) pass, and a randomized check holds each bound under the whole text's count."""
from __future__ import annotations

import json
import random

import pytest

from pagedserve.errors import ValidationError
from pagedserve.frontend.input_processor import InputProcessor
from pagedserve.frontend.prompt_bound import PROBE_CHARS_PER_TOKEN, PromptLengthBound, prompt_length_bound

BIG = 15_000_000   # characters: the prompt of the report


@pytest.fixture(scope="module")
def tokenizer():
    from pagedserve.models.loader import load_tokenizer, resolve_model
    return load_tokenizer(resolve_model(None))   # SmolLM2's GGUF: byte-level BPE, no normalizer


@pytest.fixture(scope="module")
def minilm():
    from pagedserve.models.loader import load_tokenizer, resolve_model
    from tests.helpers import minilm_path
    return load_tokenizer(resolve_model(minilm_path()))   # BertNormalizer + BertPreTokenizer + WordPiece


class Counting:
    """A tokenizer that counts the characters it is given to tokenize."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.chars = tokenizer, 0

    def __call__(self, *texts, **kwargs):   # one text, or a pair
        self.chars += sum(map(len, texts))
        return self.tokenizer(*texts, **kwargs)

    def encode(self, text, **kwargs):
        self.chars += len(text)
        return self.tokenizer.encode(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def variant(tokenizer, normalizer=None, pre_tokenizer=None):
    """The tokenizer with another normalizer and / or pre-tokenizer (JSON configurations)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    config = json.loads(tokenizer.backend_tokenizer.to_str())
    if normalizer is not None:
        config["normalizer"] = normalizer
    if pre_tokenizer is not None:
        config["pre_tokenizer"] = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(config)))


LLAMA3_SPLIT = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "behavior": "Isolated", "invert": False, "pattern": {"Regex": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
        r"\s+(?!\S)|\s+")}},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def longest_fitting(tokenizer, unit: str, limit: int) -> str:
    """unit * n for the largest n whose tokens (special ones included) stay under `limit`."""
    low, high = 1, 1
    while len(tokenizer.encode(unit * high)) < limit:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if len(tokenizer.encode(unit * middle)) < limit else (low, middle)
    return unit * low


def test_the_default_tokenizer_proves_both_bounds(tokenizer) -> None:
    bound = PromptLengthBound(tokenizer)
    assert bound.longest_token == max(map(len, tokenizer.get_vocab())) == 81
    assert bound.byte_level and bound.probe_edge is not None
    # bytes missing from the GGUF vocabulary make no token: ASCII control characters alone count for nothing
    assert bound.uncounted == "\x04\x06\x13\x14\x16\x1d" and tokenizer.encode("\x04" * 50) == []
    assert bound.counted_units("\x04" * 1000) == 0


@pytest.mark.parametrize("unit", [" ", "x ", "a", "é", "e\u0301", "中", "#", "-", "\n", "    ", "\t", "1",
                                  "\U0001F600", "<|im_start|>", "Paris ", "don't ", "\x04a", " \u00a0"])
def test_prompts_just_under_max_model_len_are_not_refused(tokenizer, unit) -> None:
    """unit * n, n the most that stay under max_model_len (one huge word, many spaces, accents,
    ...): processed, not refused; twice as long: refused as today (its exact count, or sooner)."""
    limit = 512
    processor = InputProcessor(tokenizer, 49152, limit, (2,))
    text = longest_fitting(tokenizer, unit, limit)
    assert prompt_length_bound(tokenizer).at_least(text, limit) is None
    assert len(processor.process_prompt(text).prompt_token_ids) < limit
    with pytest.raises(ValidationError, match="max_model_len is 512") as refused:
        processor.process_prompt(text * 2)
    assert refused.value.param == "prompt"


def test_a_15_mb_prompt_is_refused_without_tokenizing_it(tokenizer) -> None:
    counting = Counting(tokenizer)
    processor = InputProcessor(counting, 49152, 8192, (2,))
    words = "the capital of France is Paris " * (BIG // 31)
    for text in (words, "a" * BIG, " " * BIG, "é" * BIG):
        with pytest.raises(ValidationError, match=r"the prompt is at least \d+ tokens long \(.*\); max_model_len is "
                                                  r"8192 and at least one token must be generated") as refused:
            processor.process_prompt(text)
        assert refused.value.param == "prompt"
        assert counting.chars == 0   # its length alone: nothing was tokenized (whole, 13-33 s each)
    # a dict prompt (vLLM's TextPrompt) and the offline engine's path are the same call
    with pytest.raises(ValidationError, match="at least"):
        processor.process_prompt({"prompt": words})
    assert counting.chars == 0


def test_a_too_long_prompt_under_the_length_bound_is_refused_from_a_prefix(tokenizer) -> None:
    """600k characters of "x " can be 8192 tokens by length (81-byte tokens) but are 300k: the
    first probe, 8 characters a token of the limit, counts enough of them."""
    counting = Counting(tokenizer)
    processor = InputProcessor(counting, 49152, 8192, (2,))
    with pytest.raises(ValidationError, match="counted in its first") as refused:
        processor.process_prompt("x " * 300_000)
    assert refused.value.param == "prompt"
    assert counting.chars <= PROBE_CHARS_PER_TOKEN * 8192 + 1000


def test_a_text_that_may_fit_is_tokenized_whole(tokenizer) -> None:
    """One huge pre-token (the probe spares it: the rest of the text could change its tokens)
    under the length bound: tokenized whole, its exact count decides."""
    counting = Counting(tokenizer)
    processor = InputProcessor(counting, 49152, 8192, (2,))
    with pytest.raises(ValidationError, match="the prompt is 9375 tokens long"):
        processor.process_prompt(" " * 600_000)
    fits = ("\n" + " " * 80) * 8000   # 8000 tokens of the longest entry (81 characters): 648k characters that fit
    assert len(processor.process_prompt(fits).prompt_token_ids) == 8000


def test_the_chat_path_refuses_a_15_mb_message(tokenizer) -> None:
    processor = InputProcessor(tokenizer, 49152, 8192, (2,))
    text = processor.render_chat([{"role": "user", "content": "Paris is nice. " * (BIG // 15)}])
    with pytest.raises(ValidationError, match="at least") as refused:
        processor.process_prompt(text, add_special_tokens=False)
    assert refused.value.param == "prompt"


def test_the_bounds_are_never_above_the_whole_texts_count(tokenizer, minilm) -> None:
    """Random texts of the characters that stress each bound (spaces and newlines, contractions,
    combining marks, dropped bytes, added tokens cut in two, CJK, long runs) cut at random
    places: neither the length bound nor a probe ever counts more tokens than the whole text
    has, on the default tokenizer, a Llama 3 split, an NFC normalizer and a WordPiece."""
    pieces = ["a", "Z", " ", "  ", "\n", "\r\n", "\t", "1", "234", "'s", "'", "!", "?!", "é", "e\u0301", "\u0301",
              "中文", "\U0001F600", "\U00040000", "\x04", "\x00", "<|im_start|>", "<|im_end|>", "<|im_st", "[SEP]",
              "[MASK]", "Ġ", "#" * 10, " " * 30, " the", "don't", "İ", "ﬁ", "\u00a0", "\u3000", "\u200b"]
    tokenizers = {"default": tokenizer, "llama3 split": variant(tokenizer, pre_tokenizer=LLAMA3_SPLIT),
                  "nfc": variant(tokenizer, normalizer={"type": "NFC"}), "wordpiece": minilm}
    rng = random.Random(1234)
    for name, tok in tokenizers.items():
        bound = PromptLengthBound(tok)
        assert bound.probe_edge is not None, name
        for _ in range(300):
            parts = rng.choices(pieces, k=rng.randint(1, 120))
            if rng.random() < 0.3:
                parts.insert(rng.randrange(len(parts) + 1), rng.choice(pieces) * rng.randint(20, 300))
            text = "".join(parts)
            whole = count(tok, text)
            if bound.longest_token is not None:
                assert -(-bound.counted_units(text) // bound.longest_token) <= whole, (name, text)
            for cut in rng.sample(range(1, len(text) + 1), min(4, len(text))):
                assert bound.prefix_tokens(text, cut) <= whole, (name, text, cut)


def test_tokenizers_that_may_shrink_a_text_get_no_length_bound(tokenizer, minilm) -> None:
    """NFKC composes, BertNormalizer drops control characters, a WordPiece makes one [UNK] of a
    whole long word: no length bound (a 200k-character text of them may be a few tokens)."""
    for tok in (variant(tokenizer, normalizer={"type": "NFKC"}), minilm,
                variant(tokenizer, pre_tokenizer={"type": "Whitespace"})):
        assert PromptLengthBound(tok).longest_token is None
    assert count(minilm, "a" * 200_000) == 1 and count(minilm, "\x01" * 200_000) == 0
    for text in ("a" * 200_000, "\x01" * 200_000):
        assert prompt_length_bound(minilm).at_least(text, 257) is None
    # a Split whose pattern is not one of the known local ones gets no probe
    odd = variant(tokenizer, pre_tokenizer={"type": "Split", "behavior": "Isolated", "invert": False,
                                            "pattern": {"Regex": "[^z]*z|."}})
    assert PromptLengthBound(odd).probe_edge is None


def test_a_wordpiece_model_refuses_a_15_mb_text_from_a_prefix(minilm) -> None:
    counting = Counting(minilm)
    found = PromptLengthBound(counting).at_least("the capital of France is Paris " * (BIG // 31), 257)
    assert found is not None and found.tokens >= 257 and "first" in found.reason
    assert counting.chars < 10_000


def test_a_tokenizer_without_a_pipeline_gets_no_bound() -> None:
    class Plain:
        def encode(self, text, add_special_tokens=True):
            return [1] * len(text)

    bound = PromptLengthBound(Plain())
    assert bound.longest_token is None and bound.probe_edge is None
    assert bound.at_least("x" * 100_000, 10) is None
    assert prompt_length_bound(None).at_least("x" * 100, 10) is None


def test_embedding_engines_refuse_15_mb_inputs_and_pairs_without_tokenizing_them(tmp_path) -> None:
    """The pooling engine's prompts (/v1/embeddings, TEI /embed, /classify) and a cross-encoder's
    pairs (/score, /rerank) take the same bound: a 15 MB text is refused naming its own field,
    after a prefix, not whole; with truncation asked for, it is tokenized (keeping the first
    tokens needs the text), and a pair of short texts is scored as before."""
    from pagedserve import LLM
    from tests.models.test_score import write_cross_encoder
    llm = LLM(model=write_cross_encoder(str(tmp_path / "cross"), seed=3))
    try:
        engine = llm.engine
        engine.tokenizer = counting = Counting(engine.tokenizer)
        big = "the capital of France is Paris " * (BIG // 31)
        with pytest.raises(ValidationError, match="at least") as refused:
            engine.process_pair("a query", big, names=("text_1", "text_2"))
        assert refused.value.param == "text_2"
        with pytest.raises(ValidationError, match="at least") as refused:
            engine.process_prompt({"prompt": big}, param="input")
        assert refused.value.param == "input" and counting.chars < 100_000
        ids, types = engine.process_pair("a query", "a document")
        assert len(ids) == len(types) > 4
        assert len(engine.process_prompt(big[:200_000], truncate_prompt_tokens=-1)) == engine.max_model_len
    finally:
        llm.shutdown()


PIECES = ["a", "Z", " ", "  ", "\n", "\r\n", "\t", "1", "234", "'s", "'", "!", "?!", "é", "e\u0301", "\u0301",
          "中文", "\U0001F600", "\x04", "<|im_start|>", "<|im_end|>", "<|im_st", "[SEP]", "[MASK]", "Ġ", "#" * 10,
          " " * 30, " the", " capital", " of", " France", "don't", "İ", "\u00a0", "\u200b"]


def test_the_last_tokens_read_from_a_suffix_are_the_whole_texts(tokenizer, minilm) -> None:
    """tail_ids (truncate_prompt_tokens: the last k tokens) from a suffix of a long random text of
    the pieces that stress a cut (contractions, combining marks, added tokens cut in two, long runs)
    equals the whole text's last k ids, with and without special tokens, on the default tokenizer,
    a Llama 3 split, an NFC normalizer and a WordPiece (whose [SEP] is appended); and it reads only
    a suffix."""
    tokenizers = {"default": tokenizer, "llama3 split": variant(tokenizer, pre_tokenizer=LLAMA3_SPLIT),
                  "nfc": variant(tokenizer, normalizer={"type": "NFC"}), "wordpiece": minilm}
    rng = random.Random(46)
    for name, tok in tokenizers.items():
        counting = Counting(tok)
        bound = PromptLengthBound(counting)
        read = 0
        for trial in range(40):
            parts = rng.choices(PIECES, k=rng.randint(2000, 6000))
            if rng.random() < 0.3:
                parts.insert(rng.randrange(len(parts) + 1), rng.choice(PIECES) * rng.randint(20, 300))
            text = "".join(parts)
            keep, specials = rng.choice([1, 2, 7, 50, 200]), trial % 2 == 0
            counting.chars = 0
            tail = bound.tail_ids(text, keep, specials)
            read += counting.chars
            assert tail is not None, (name, trial)
            assert tail == tok.encode(text, add_special_tokens=specials)[-keep:], (name, trial, keep, specials)
        assert read < 40 * 6000 * 4 // 4, (name, read)   # a small part of what the texts hold
    sep = minilm.convert_tokens_to_ids("[SEP]")
    assert PromptLengthBound(minilm).tail_ids("word " * 5000, 3, True)[-1] == sep


def test_a_text_not_far_longer_than_its_tail_is_tokenized_whole(tokenizer) -> None:
    """No suffix probe where the text is short against the tokens kept, or where the pipeline is not
    local (the caller then tokenizes it whole)."""
    bound = PromptLengthBound(tokenizer)
    assert bound.tail_ids("a few words here", 3) is None
    assert bound.tail_ids("word " * 100, 200) is None
    not_local = variant(tokenizer, normalizer={"type": "Replace", "pattern": {"Regex": "a+"}, "content": "b"})
    assert PromptLengthBound(not_local).tail_ids("word " * 100_000, 3) is None


def test_the_first_tokens_read_from_a_prefix_are_the_whole_texts(minilm) -> None:
    """head_text (the embedding route's truncation from the right): the text the tokenizer needs to
    read for its first k tokens; truncating it gives the whole text's truncated ids."""
    bound = PromptLengthBound(minilm)
    rng = random.Random(7)
    for trial in range(30):
        text = "".join(rng.choices(PIECES, k=rng.randint(2000, 5000)))
        keep = rng.choice([3, 16, 128])
        head = bound.head_text(text, keep)
        assert len(head) < len(text) // 2, trial
        cut = minilm(head, truncation=True, max_length=keep)["input_ids"]
        assert cut == minilm(text, truncation=True, max_length=keep)["input_ids"], (trial, keep)
    assert bound.head_text("short text", 16) == "short text"
