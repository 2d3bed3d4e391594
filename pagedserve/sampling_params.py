"""SamplingParams, shaped like vLLM's, validated at construction: a bad value raises
ValidationError naming the field."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from pagedserve.errors import ValidationError

_SAMPLING_EPS = 1e-5
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1   # what torch.Generator.manual_seed accepts
_FLOAT_FIELDS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p",
                 "min_p", "typical_p")


@dataclass
class StructuredOutputsParams:
    """Constrained decoding, as vLLM spells it: exactly one of `json` (a JSON schema, as a dict
    or its text), `regex`, `choice` (the output is one of these strings), `grammar` (EBNF, as
    xgrammar reads it) or `json_object=True` (any JSON object). Checked for shape here; the
    grammar itself is compiled (and rejected if invalid) when the request is processed."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(given) != 1:
            raise ValidationError("structured_outputs takes exactly one of json, regex, choice, grammar or "
                                  f"json_object, got {', '.join(given) or 'none'}", "structured_outputs")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    self.json = json.loads(self.json)
                except ValueError as exc:
                    raise ValidationError(f"structured_outputs.json is not valid JSON: {exc}", "json") from None
            if not isinstance(self.json, dict):   # ("null" too: it would leave no constraint at all)
                raise ValidationError("structured_outputs.json must be a JSON schema object", "json")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValidationError(f"structured_outputs.{name} must be a non-empty string", name)
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValidationError("structured_outputs.choice must be a non-empty list of non-empty strings",
                                  "choice")
        if self.json_object not in (None, True, False):
            raise ValidationError("structured_outputs.json_object must be a boolean", "json_object")

    @property
    def kind(self) -> str:
        """Which constraint: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(f.name for f in fields(self) if getattr(self, f.name) not in (None, False))


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    typical_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None   # vLLM's: only these tokens may be sampled
    structured_outputs: StructuredOutputsParams | None = None
    # vLLM's: words never generated. Each is tokenized as written (leading spaces stripped) and
    # with one leading space; a token sequence's last token is banned at a step whose latest
    # output tokens are the rest of that sequence (its only token: at every step).
    bad_words: list[str] | None = None
    # bad_words as token sequences, set by the input processor (the engine's tokenizer); internal
    _bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False, compare=False)

    @property
    def bad_words_token_ids(self) -> list[list[int]] | None:
        """The token sequences bad_words ban (None until the input processor tokenized them)."""
        return self._bad_words_token_ids

    @property
    def has_penalties(self) -> bool:
        """Repetition, frequency or presence penalties: they count the tokens sampled so far."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits or asks for more than the token: the
        runner's fast path (one argmax, no per-row sampling tensors)."""
        return self.temperature < _SAMPLING_EPS and not self.logit_bias and not self.min_tokens and self.logprobs is None \
            and not self.has_penalties and self.allowed_token_ids is None and not self.bad_words

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = _as_list(self.stop, "stop")
        self.stop_token_ids = _as_list(self.stop_token_ids or [], "stop_token_ids")
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _as_list(self.allowed_token_ids, "allowed_token_ids")
        self.bad_words = [] if self.bad_words is None else _as_list(self.bad_words, "bad_words")   # None: [] (vLLM)
        not_str = next((i for i, word in enumerate(self.bad_words) if not isinstance(word, str)), None)
        if not_str is not None:
            raise ValidationError(f"bad_words must be a list of strings; {self.bad_words[not_str]!r:.80} is not one",
                                  "bad_words")
        self.bad_words = list(dict.fromkeys(self.bad_words))   # duplicates dropped, as vLLM does
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            try:   # OpenAI sends token ids as strings
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError) as exc:
                raise ValidationError(f"logit_bias must map token ids to numbers: {exc}", "logit_bias") from exc
        self.validate()

    def validate(self) -> None:
        """Raise ValidationError(param=...) for the first invalid field."""
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool), name,
                   f"{name} must be a number, got {value!r}")
        _check(isinstance(self.n, int) and self.n >= 1, "n", f"n must be at least 1, got {self.n}")
        if self.best_of is not None:
            _check(isinstance(self.best_of, int) and self.best_of >= self.n, "best_of",
                   f"best_of must be >= n ({self.n}), got {self.best_of}")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.repetition_penalty > 0.0, "repetition_penalty",
               f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check(self.temperature >= 0.0, "temperature",
               f"temperature must be non-negative, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k",
               f"top_k must be -1 (disable), 0 (disable) or at least 1, got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        _check(0.0 < self.typical_p <= 1.0, "typical_p", f"typical_p must be in (0, 1], got {self.typical_p}")
        if self.max_tokens is not None:
            _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
                   f"max_tokens must be at least 1, got {self.max_tokens}")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens",
               f"min_tokens must be greater than or equal to 0, got {self.min_tokens}")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens",
                   f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                # -1: the whole vocabulary (vLLM), allowed when the engine's max_logprobs allows it
                _check(isinstance(value, int) and not isinstance(value, bool) and value >= -1, name,
                       f"{name} must be non-negative (or -1 for the whole vocabulary), got {value}")
        if self.seed is not None:
            _check(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed",
                   f"seed must be an integer, got {self.seed!r}")
            _check(SEED_MIN <= self.seed <= SEED_MAX, "seed",
                   f"seed must be in [{SEED_MIN}, {SEED_MAX}], got {self.seed}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "stop_token_ids must be non-negative integers")
        if self.stop and not self.detokenize:
            raise ValidationError("stop strings are only supported when detokenize is True", "detokenize")
        if self.logit_bias:
            for token_id, bias in self.logit_bias.items():
                _check(-100.0 <= bias <= 100.0, "logit_bias", f"logit_bias values must be in [-100, 100], got {bias}")
                _check(token_id >= 0, "logit_bias", f"logit_bias token ids must be non-negative, got {token_id}")
        if self.allowed_token_ids is not None:
            _check(bool(self.allowed_token_ids) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                        for t in self.allowed_token_ids), "allowed_token_ids",
                   "allowed_token_ids must be a non-empty list of non-negative token ids")
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", "structured_outputs must be a StructuredOutputsParams")

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ValidationError(message, param)


def _as_list(value: object, param: str) -> list:
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise ValidationError(f"{param} must be a list, got {value!r}", param)
    return list(value)


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's BeamSearchParams, for LLM.beam_search (frontend/beam_search.py)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0   # accepted as vLLM does: beams are ranked by the model's raw logprobs
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False   # the end-of-sequence token in a completed beam's token ids

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValidationError(f"{name} must be an integer >= 1, got {value!r}", name)
        for name in ("temperature", "length_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValidationError(f"{name} must be a finite number, got {value!r}", name)
        if self.temperature < 0:
            raise ValidationError(f"temperature must be non-negative, got {self.temperature}", "temperature")
