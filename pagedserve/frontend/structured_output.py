"""Structured outputs, the frontend half: StructuredOutputsParams -> an xgrammar CompiledGrammar.

One GrammarCompiler per engine, built on first use from the engine's tokenizer (with the
model's vocabulary size, which may exceed the tokenizer's, and the engine's EOS ids as the
grammar's stop tokens). xgrammar's compiler caches compiled grammars by their text, so a
schema compiles once however many requests send it. `compile` is thread-safe: it runs in
LLMEngine.process_request (the AsyncEngine's processing pool, off the event loop and off the
engine thread). An invalid schema, regex or grammar is a ValidationError naming the field.

The compiled grammar is opaque to everything above the core: it rides on the core Request
(`Request.grammar`), where core/structured_output.py gives each sequence its own matcher.
"""
from __future__ import annotations

import collections
import functools
import json
import re
import threading
from typing import Any

from pagedserve.errors import ValidationError
from pagedserve.sampling_params import StructuredOutputsParams

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "
_CPP_PREFIX = re.compile(r"^\s*\[[^\]]*\]\s*\S+:\d+:\s*")
CACHE_LIMIT_BYTES = 256 * 2**20
OBJECTS_KEPT = 256


class GrammarCompiler:
    """Compiles StructuredOutputsParams for one tokenizer; safe from any thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._compiler = None
        self._lock = threading.Lock()
        # one CompiledGrammar object per distinct constraint (LRU): the core sends a grammar
        # to its grammar process once per object (core/structured_output.ProcessGrammars)
        self._objects: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()

    def _get(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar
                info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=list(self.eos_token_ids) or None)
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_limit_bytes=CACHE_LIMIT_BYTES)
            return self._compiler

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The xgrammar CompiledGrammar for `params` (the same object for the same constraint
        while it stays among the last OBJECTS_KEPT); ValidationError naming the field if it
        cannot compile."""
        key = (params.kind, json.dumps(getattr(params, params.kind)))   # key order matters (property order)
        with self._lock:
            compiled = self._objects.get(key)
            if compiled is not None:
                self._objects.move_to_end(key)
                return compiled
        compiled = self._compile(params)
        with self._lock:
            compiled = self._objects.setdefault(key, compiled)
            while len(self._objects) > OBJECTS_KEPT:
                self._objects.popitem(last=False)
        return compiled

    def _compile(self, params: StructuredOutputsParams) -> Any:
        if self.tokenizer is None:
            raise ValidationError("structured_outputs needs a tokenizer (the engine runs with "
                                  "skip_tokenizer_init=True)", "structured_outputs")
        compiler = self._get()
        kind = params.kind
        try:
            if kind == "json":
                return compiler.compile_grammar(json_schema_ebnf(json.dumps(params.json)))
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "grammar":
                return compiler.compile_grammar(params.grammar)
            return compiler.compile_grammar(choice_grammar(params.choice))
        except (RuntimeError, ValueError, TypeError) as exc:
            text = _CPP_PREFIX.sub("", str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
                    "grammar": "grammar", "choice": "choice"}[kind]
            raise ValidationError(f"structured_outputs.{kind}: invalid {what}: {text}", kind) from None


# xgrammar (0.2.9; its issue #286) lets a string with minLength/maxLength take any character but
# quote, backslash, CR and LF, so raw control characters (U+0000-U+001F), which JSON forbids
# unescaped, pass; its unbounded strings exclude them. The bounded rule, with them excluded:
_BOUNDED_STRING_CHARS = '[^\\"\\\\\\r\\n]'
_BOUNDED_STRING_CHARS_FIXED = '[^\\0-\\x1f\\"\\\\\\r\\n]'


@functools.lru_cache(maxsize=1024)
def json_schema_ebnf(schema: str) -> str:
    """xgrammar's EBNF for a JSON schema (compact separators), every string rule excluding
    raw control characters; raises what xgrammar raises for an invalid schema."""
    import xgrammar
    text = str(xgrammar.Grammar.from_json_schema(schema, any_whitespace=False))
    return text.replace(_BOUNDED_STRING_CHARS, _BOUNDED_STRING_CHARS_FIXED)


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose language is exactly the given strings (JSON string escaping is also
    xgrammar's EBNF literal escaping)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)
