"""A text's token count bounded from below before it is tokenized whole (InputProcessor and the
TGI / embeddings routes refuse a text that surely cannot fit before tokenizing it).

Tokenizing costs ~1 us a character (a 15 MB prompt held an input thread 13-33 s before its 400),
so a text that cannot fit is refused from what is cheap to know: its length, where the tokenizer
proves that every token covers at most its longest vocabulary entry's length; else the tokens of
a bounded prefix, where cutting the text can change only the prefix's last pre-tokens. Neither
ever exceeds the whole text's count: a text that fits is never refused, it is tokenized whole.
"""
from __future__ import annotations

import contextlib
import json
import weakref
from typing import Any, ContextManager, NamedTuple

PROBE_CHARS_PER_TOKEN = 8           # a too-long text's first probe: this many characters per token of the limit
PROBE_SPARED_WORDS = 3              # a probe does not count the tokens of its prefix's last pre-tokens ...
PROBE_EDGE_CHARS = 64               # ... nor those ending in its last characters (+ the longest added token)

# normalizers that never shorten a text (NFC / NFKC compose, Strip and StripAccents drop characters,
# BertNormalizer drops control characters, a Replace may shorten): a length bound holds through them
_NON_SHRINKING_NORMALIZERS = frozenset({"NFD", "NFKD", "Lowercase", "Prepend"})
# normalizers whose output, for a prefix, differs from the whole text's only in its last characters
# (a composition, an accent, a literal replaced across the cut): a probe holds through them (Strip and
# SentencePiece's Precompiled are left out: a randomized check found a Strip + Lowercase prefix over)
_LOCAL_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents", "Prepend",
                                "BertNormalizer"})
# pre-tokenizers that split at runs of one class of characters (spaces, letters, digits, punctuation)
# or at single characters: a prefix's pre-tokens are the whole text's, its last ones aside
_LOCAL_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "BertPreTokenizer", "Whitespace", "WhitespaceSplit",
                                   "Digits", "Punctuation"})
# the split patterns of GPT-2 (explicit), Llama 3 / cl100k and Qwen2: alternatives of one run of a class,
# optionally after one fixed character; a match looks no further than the end of the run it starts (and
# one character past it), so only the pre-tokens of a prefix's last run may differ from the whole text's
_LOCAL_SPLIT_PATTERNS = frozenset({
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"})


class TokensAtLeast(NamedTuple):
    tokens: int   # the text has at least this many tokens (special tokens aside)
    reason: str   # how that is known, for the error message


class PromptLengthBound:
    """Lower bounds on how many tokens a text makes, read off a Hugging Face fast tokenizer's
    pipeline (normalizer, pre-tokenizer, model, added tokens), for a text too long to fit:

    - from its length, where every token provably covers at most `longest_token` characters of
      the text and every character but those in `uncounted` is covered by some token: then a text
      of L counted characters is at least ceil(L / longest_token) tokens. That needs a normalizer
      that never shortens text (none, NFD, NFKD, Lowercase, Prepend, a Replace by no shorter text),
      pre-tokenizers that drop nothing (no Whitespace / BertPreTokenizer, no Split "removed"),
      added tokens that absorb no spaces (no lstrip / rstrip), and a model that turns every
      character into tokens: a byte-level BPE (a character counts when one of its UTF-8 bytes is
      in the vocabulary: its token covers that byte; a token of an n-character byte-level entry
      covers n bytes), or a BPE / Unigram with byte fallback (each character is at least one
      token). A WordPiece (one [UNK] for a whole long word) or a model that may fuse unknown
      characters into one token gives no such bound.
    - from a prefix's tokens, where the pipeline is local: the normalizer and pre-tokenizer act on
      runs of one class of characters, so the prefix's pre-tokens are the whole text's except its
      last few and the model tokenizes each pre-token on its own. The probe counts the prefix's
      tokens less those of its last PROBE_SPARED_WORDS pre-tokens and those ending in its last
      `probe_edge` characters (an added token or a literal pattern cut in two, a normalization
      across the cut): each counted token is one of the whole text's.

    Either bound needs `tokenizer.backend_tokenizer` (a `tokenizers` pipeline); another tokenizer
    gets none, and its texts are tokenized whole, as before."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.longest_token: int | None = None   # the length bound's: units (below) a token covers at most
        self.byte_level = False                 # units: the text's UTF-8 bytes (else its characters)
        self.uncounted = ""                     # ASCII characters whose byte makes no token
        self.lead_extra = 0                     # > 0: some lead bytes make no token; their characters have
                                                # at least this many bytes more (which do)
        self.probe_edge: int | None = None      # the probe's: None where the pipeline is not local
        self._specials: tuple[list[int] | None, int] | None = None   # _appended_specials, once read
        try:
            backend = tokenizer.backend_tokenizer
            normalizers = _pipeline_parts(backend.normalizer, "normalizers")
            pre_tokenizers = _pipeline_parts(backend.pre_tokenizer, "pretokenizers")
            model = backend.model
            added = list(backend.get_added_tokens_decoder().values())
            vocab = backend.get_vocab(with_added_tokens=True)
            model_vocab = backend.get_vocab(with_added_tokens=False)
        except Exception:   # a slow tokenizer, a test's stand-in, a pipeline that cannot be read
            return
        model_type = type(model).__name__
        absorbs_spaces = any(token.lstrip or token.rstrip for token in added)
        if not absorbs_spaces and vocab:
            self._length_bound(normalizers, pre_tokenizers, model, model_type, vocab, model_vocab)
        if not absorbs_spaces and all(_local_normalizer(part) for part in normalizers) \
                and all(_local_pre_tokenizer(part) for part in pre_tokenizers) \
                and model_type in ("BPE", "WordPiece", "Unigram", "WordLevel") and not getattr(model, "dropout", None):
            literals = [len(part["pattern"]["String"]) for part in normalizers + pre_tokenizers
                        if isinstance(part.get("pattern"), dict) and "String" in part["pattern"]]
            self.probe_edge = PROBE_EDGE_CHARS + max([len(t.content) for t in added] + literals, default=0)

    def _length_bound(self, normalizers: list[dict], pre_tokenizers: list[dict], model: Any, model_type: str,
                      vocab: dict[str, int], model_vocab: dict[str, int]) -> None:
        """Set longest_token (and uncounted) where the pipeline proves the length bound."""
        if not all(_non_shrinking(part) for part in normalizers) \
                or not all(_lossless_pre_tokenizer(part) for part in pre_tokenizers):
            return
        if any(part.get("type") == "ByteLevel" for part in pre_tokenizers):
            if model_type != "BPE":
                return
            missing = [byte for byte, char in _BYTE_CHARS.items() if char not in model_vocab]
            if any(0x80 <= byte < 0xC0 for byte in missing):   # a multi-byte character could vanish whole
                return
            uncounted = "".join(chr(byte) for byte in missing if byte < 0x80)   # alone, such a byte makes no token
            if uncounted and normalizers:   # a normalizer might turn counted characters into them
                return
            # a lead byte C2-DF starts 2 bytes, E0-EF 3, F0-F4 4 (C0, C1, F5-FF are never in UTF-8)
            leads = [1 if byte < 0xE0 else 2 if byte < 0xF0 else 3 for byte in missing if 0xC2 <= byte <= 0xF4]
            self.byte_level, self.uncounted, self.lead_extra = True, uncounted, min(leads, default=0)
        elif model_type not in ("BPE", "Unigram") or not getattr(model, "byte_fallback", False) \
                or any(f"<0x{byte:02X}>" not in model_vocab for byte in range(256)):
            return
        self.longest_token = max(map(len, vocab))

    def at_least(self, text: str, limit: int, lock: ContextManager[Any] | None = None) -> TokensAtLeast | None:
        """Proof that `text` makes at least `limit` tokens (its special tokens aside), or None
        (it may fit: tokenize it whole). `lock` is held while the tokenizer runs (an engine
        whose tokenizer calls must not overlap)."""
        longest = self.longest_token
        if longest is not None and len(text) * (4 if self.byte_level else 1) > (limit - 1) * longest:
            units = self.counted_units(text)
            tokens = -(-units // longest)
            if tokens >= limit:
                what = "UTF-8 bytes" if self.byte_level else "characters"
                return TokensAtLeast(tokens, f"{units} {what} that make tokens, none of this tokenizer's tokens "
                                             f"longer than {longest}")
        if self.probe_edge is None:
            return None
        size = PROBE_CHARS_PER_TOKEN * limit + self.probe_edge
        while size <= len(text) // 2:   # a longer probe would cost about what the whole text does
            with lock if lock is not None else contextlib.nullcontext():
                tokens = self.prefix_tokens(text, size)
            if tokens >= limit:
                return TokensAtLeast(tokens, f"counted in its first {size} characters")
            size *= 4
        return None

    def tail_ids(self, text: str, keep: int, add_special_tokens: bool = True,
                 lock: ContextManager[Any] | None = None) -> list[int] | None:
        """tokenizer.encode(text, add_special_tokens)[-keep:] (truncate_prompt_tokens: the last
        `keep` tokens) from a suffix of the text, or None: tokenize it whole (a pipeline that is
        not local, or a text not far longer than `keep` tokens can cover). The mirror of the
        prefix probe: the suffix's tokens of its pre-tokens after the first PROBE_SPARED_WORDS,
        starting past its first probe_edge characters, are the whole text's last tokens; once
        `keep` of them (with any special tokens the tokenizer appends) are known, that is the
        answer. A suffix of PROBE_CHARS_PER_TOKEN * keep + probe_edge characters first, x4 while
        that is at most half the text. `lock`: held while the tokenizer runs."""
        appended = self._appended_specials(lock) if add_special_tokens else []
        if self.probe_edge is None or appended is None or keep < 1:
            return None
        size = PROBE_CHARS_PER_TOKEN * keep + self.probe_edge
        while size <= len(text) // 2:
            with lock if lock is not None else contextlib.nullcontext():
                encoding = self.tokenizer(text[-size:], add_special_tokens=False, return_offsets_mapping=True)
            sure = self._sure_tail(encoding)
            if sure is not None and len(sure) + len(appended) >= keep:
                return (sure + appended)[-keep:]
            size *= 4
        return None

    def last_ids(self, text: str, keep: int, add_special_tokens: bool = True) -> list[int]:
        """tokenizer.encode(text, add_special_tokens)[-keep:]: from a suffix where tail_ids can
        tell, else from the whole text (truncate_prompt_tokens, TGI's truncate)."""
        tail = self.tail_ids(text, keep, add_special_tokens)
        if tail is not None:
            return tail
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))[-keep:]

    def head_text(self, text: str, keep: int, lock: ContextManager[Any] | None = None) -> str:
        """A prefix of `text` whose first `keep` tokens are surely the whole text's (the prefix
        probe's count), or the text itself: what a tokenizer truncating to `keep` tokens
        (special tokens included) from the right needs to read."""
        if self.probe_edge is None or self._appended_specials(lock) is None or keep <= self._special_count(lock):
            return text   # (a cut to fewer tokens than the specials: the tokenizer's own business)
        size = PROBE_CHARS_PER_TOKEN * keep + self.probe_edge
        while size <= len(text) // 2:
            with lock if lock is not None else contextlib.nullcontext():
                if self.prefix_tokens(text, size) >= keep:
                    return text[:size]
            size *= 4
        return text

    def _sure_tail(self, encoding: Any) -> list[int] | None:
        """The ids of a suffix's encoding from its first sure token on (None if a token after it
        belongs to no pre-token: no claim is made then)."""
        words = encoding.word_ids()
        for i, (word, (start, _)) in enumerate(zip(words, encoding["offset_mapping"])):
            if word is not None and word >= PROBE_SPARED_WORDS and start >= self.probe_edge:
                return list(encoding["input_ids"][i:]) if None not in words[i:] else None
        return []

    def _appended_specials(self, lock: ContextManager[Any] | None = None) -> list[int] | None:
        """The ids the tokenizer appends after a text's own with add_special_tokens (BERT's [SEP]; none
        for Llama's), or None if its specials do not just surround the text's ids (read once)."""
        return self._read_specials(lock)[0]

    def _special_count(self, lock: ContextManager[Any] | None = None) -> int:
        """How many special tokens the tokenizer adds to a text in all."""
        return self._read_specials(lock)[1]

    def _read_specials(self, lock: ContextManager[Any] | None) -> tuple[list[int] | None, int]:
        if self._specials is None:
            try:
                with lock if lock is not None else contextlib.nullcontext():
                    plain = list(self.tokenizer("a b", add_special_tokens=False)["input_ids"])
                    full = list(self.tokenizer("a b", add_special_tokens=True)["input_ids"])
            except Exception:
                plain, full = [], []
            starts = [i for i in range(len(full) - len(plain) + 1) if plain and full[i:i + len(plain)] == plain]
            self._specials = (full[starts[0] + len(plain):] if starts else None, len(full) - len(plain))
        return self._specials

    def counted_units(self, text: str) -> int:
        """How many of the text's units (UTF-8 bytes for a byte-level BPE, else characters) some
        token surely covers: a byte-level BPE drops the bytes missing from its vocabulary."""
        if not self.byte_level:
            return len(text)
        size = len(text.encode("utf-8", "surrogatepass"))
        units = size - sum(text.count(char) for char in self.uncounted)
        if self.lead_extra:   # characters whose lead byte is dropped: each has lead_extra more bytes at least
            units -= (size - len(text)) // self.lead_extra
        return units

    def prefix_tokens(self, text: str, size: int) -> int:
        """How many of the tokens of text[:size] are surely tokens of the whole text: those of
        its pre-tokens but the last PROBE_SPARED_WORDS, ending before its last probe_edge
        characters (the tokenizer's own padding and truncation off)."""
        assert self.probe_edge is not None
        encoding = self.tokenizer(text[:size], add_special_tokens=False, return_offsets_mapping=True)
        words = encoding.word_ids()
        last = max((word for word in words if word is not None), default=None)
        if last is None:
            return 0
        spared, edge = last - PROBE_SPARED_WORDS, size - self.probe_edge
        return sum(1 for word, (_, end) in zip(words, encoding["offset_mapping"])
                   if word is not None and word <= spared and end <= edge)


def _byte_chars() -> dict[int, str]:
    """Byte-level BPE's alphabet (GPT-2's bytes_to_unicode): byte -> the character standing for it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (byte for byte in range(256) if byte not in printable)
    return {**{byte: chr(byte) for byte in printable}, **{byte: chr(256 + i) for i, byte in enumerate(extra)}}


_BYTE_CHARS = _byte_chars()


def _pipeline_parts(component: Any, key: str) -> list[dict]:
    """A normalizer or pre-tokenizer as the list of its parts' configurations (a Sequence flattened)."""
    if component is None:
        return []
    return _flatten(json.loads(component.__getstate__()), key)


def _flatten(config: dict | None, key: str) -> list[dict]:
    if config is None:
        return []
    if config.get("type") == "Sequence":
        return [part for child in config.get(key) or [] for part in _flatten(child, key)]
    return [config]


def _non_shrinking(part: dict) -> bool:
    if part.get("type") == "Replace":
        pattern = part.get("pattern") or {}
        return "String" in pattern and len(part.get("content") or "") >= len(pattern["String"]) >= 1
    return part.get("type") in _NON_SHRINKING_NORMALIZERS


def _local_normalizer(part: dict) -> bool:
    if part.get("type") == "Replace":
        return "String" in (part.get("pattern") or {})
    return part.get("type") in _LOCAL_NORMALIZERS


def _lossless_pre_tokenizer(part: dict) -> bool:
    if part.get("type") in ("Split", "Punctuation"):
        return part.get("behavior") != "Removed"
    return part.get("type") in ("ByteLevel", "Metaspace", "Digits")


def _local_pre_tokenizer(part: dict) -> bool:
    if part.get("type") == "Split":
        pattern = part.get("pattern") or {}
        return "String" in pattern or pattern.get("Regex") in _LOCAL_SPLIT_PATTERNS
    return part.get("type") in _LOCAL_PRE_TOKENIZERS


_BOUNDS: "weakref.WeakKeyDictionary[Any, PromptLengthBound]" = weakref.WeakKeyDictionary()


def prompt_length_bound(tokenizer: Any) -> PromptLengthBound:
    """The tokenizer's PromptLengthBound, read once (kept while the tokenizer lives)."""
    try:
        return _BOUNDS[tokenizer]
    except (KeyError, TypeError):
        pass
    bound = PromptLengthBound(tokenizer)
    try:
        _BOUNDS[tokenizer] = bound
    except TypeError:   # not weakly referenceable: read each time
        pass
    return bound
