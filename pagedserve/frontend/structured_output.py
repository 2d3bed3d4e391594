"""Structured outputs, the frontend half: StructuredOutputsParams -> an xgrammar CompiledGrammar.

One GrammarCompiler per engine, built on first use from the engine's tokenizer (with the
model's vocabulary size, which may exceed the tokenizer's, and the engine's EOS ids as the
grammar's stop tokens). xgrammar's compiler caches compiled grammars by their text, so a
schema compiles once however many requests send it. `compile` is thread-safe. Offline it runs
in LLMEngine.process_request; in the server (AsyncEngine) in child processes
(frontend/grammar_compile.py, which builds on this module), awaited on threads of their own, so a slow grammar delays
only its own request, never the tokenizing of others, and is killed past its deadline or
when its client goes. An invalid schema, regex or grammar, one that admits no output and
one past the deadline are ValidationErrors naming the field.

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

from pagedserve.errors import OverloadedError, ValidationError
from pagedserve.sampling_params import StructuredOutputsParams

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "
_CPP_PREFIX = re.compile(r"^\s*\[[^\]]*\]\s*\S+:\d+:\s*")
CACHE_LIMIT_BYTES = 256 * 2**20
OBJECTS_KEPT = 256


class GrammarCompiler:
    """Compiles StructuredOutputsParams for one tokenizer; safe from any thread. In-process by
    default (the offline LLM); after `isolate()` (the server) in child processes, each compile
    under the caller's deadline (frontend/grammar_compile.py)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._compiler = None
        self._info = None
        self._processes = None   # grammar_compile.CompileProcesses once isolated
        self.timeout_s: float | None = None
        self._lock = threading.Lock()
        # one CompiledGrammar object per distinct constraint (LRU): the core sends a grammar
        # to its grammar process once per object (core/structured_output.ProcessGrammars)
        self._objects: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()

    def _tokenizer_info(self) -> Any:
        with self._lock:
            if self._info is None:
                import xgrammar
                self._info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=list(self.eos_token_ids) or None)
            return self._info

    def _get(self):
        info = self._tokenizer_info()
        with self._lock:
            if self._compiler is None:
                import xgrammar
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_limit_bytes=CACHE_LIMIT_BYTES)
            return self._compiler

    def tokenizer_info_json(self) -> str:
        return self._tokenizer_info().serialize_json()

    def isolate(self, processes: Any, timeout_s: float) -> None:
        """Compile through `processes` (grammar_compile.CompileProcesses: child processes) from
        now on: a compile running past `timeout_s` is stopped and its request gets a
        ValidationError naming its field; one whose caller gave up (cancel) is stopped too;
        waiting for a process is bounded by twice `timeout_s`. See grammar_compile.isolate."""
        self.timeout_s = timeout_s
        self._processes = processes

    def close(self) -> None:
        if self._processes is not None:
            self._processes.close()

    def compile(self, params: StructuredOutputsParams, cancel: threading.Event | None = None) -> Any:
        """The xgrammar CompiledGrammar for `params` (the same object for the same constraint
        while it stays among the last OBJECTS_KEPT); ValidationError naming the field if it
        cannot compile, admits no output or (isolated) does not compile within timeout_s;
        OverloadedError if (isolated) no compile process came free within twice that. `cancel`
        set: the caller is gone, the compile is stopped (GrammarCompileCancelled)."""
        key = (params.kind, json.dumps(getattr(params, params.kind)))   # key order matters (property order)
        with self._lock:
            compiled = self._objects.get(key)
            if compiled is not None:
                self._objects.move_to_end(key)
                return compiled
        if self.tokenizer is None:
            raise ValidationError("structured_outputs needs a tokenizer (the engine runs with "
                                  "skip_tokenizer_init=True)", "structured_outputs")
        if self._processes is None:
            compiled = compile_constraint(self._get(), params.kind, getattr(params, params.kind))
        else:
            compiled = self._compile_isolated(params, cancel)
        with self._lock:
            compiled = self._objects.setdefault(key, compiled)
            while len(self._objects) > OBJECTS_KEPT:
                self._objects.popitem(last=False)
        return compiled

    def _compile_isolated(self, params: StructuredOutputsParams, cancel: threading.Event | None) -> Any:
        import xgrammar
        kind = params.kind
        try:
            status, payload = self._processes.run((kind, getattr(params, kind)), self.timeout_s, cancel)
        except GrammarCompileBusy:
            raise OverloadedError(f"every grammar compile process stayed busy for {2 * self.timeout_s:g} s; "
                                  "retry later") from None
        except GrammarCompileTimeout:
            raise ValidationError(f"structured_outputs.{kind}: the {WHAT[kind]} did not compile within "
                                  f"{self.timeout_s:g} s (the server's --grammar-compile-timeout); simplify it",
                                  kind) from None
        except RuntimeError as exc:   # the child died on it (xgrammar crashed or ran out of memory)
            raise ValidationError(f"structured_outputs.{kind}: the {WHAT[kind]} could not be compiled: {exc}",
                                  kind) from None
        if status != "ok":
            raise ValidationError(payload, kind)
        return xgrammar.CompiledGrammar.deserialize_json(payload, self._tokenizer_info())


class GrammarCompileTimeout(Exception):
    """An isolated compile ran past its timeout (its child is killed)."""


class GrammarCompileBusy(Exception):
    """No compile process came free within twice the timeout."""


class GrammarCompileCancelled(Exception):
    """The caller of an isolated compile gave up (its client went away); its child is killed."""


WHAT = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "grammar": "grammar",
        "choice": "choice"}


def compile_constraint(compiler: Any, kind: str, value: Any) -> Any:
    """One constraint (a StructuredOutputsParams field's kind and value) compiled by an xgrammar
    GrammarCompiler, checked to admit some output: ValidationError naming `kind` if it does
    not compile, or if no token can start it (its language is empty: `root ::= root`, the
    regex `[^\\s\\S]`), which masking would otherwise turn into a failed request."""
    import xgrammar
    try:
        if kind == "json":
            compiled = compiler.compile_grammar(json_schema_ebnf(json.dumps(value)))
        elif kind == "json_object":
            compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        elif kind == "regex":
            compiled = compiler.compile_regex(value)
        elif kind == "grammar":
            compiled = compiler.compile_grammar(value)
        else:
            compiled = compiler.compile_grammar(choice_grammar(value))
    except (RuntimeError, ValueError, TypeError) as exc:
        text = _CPP_PREFIX.sub("", str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValidationError(f"structured_outputs.{kind}: invalid {WHAT[kind]}: {text}", kind) from None
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    if not bool(bitmask.any()):
        raise ValidationError(f"structured_outputs.{kind}: the {WHAT[kind]} admits no output (no token can "
                              "start a string it accepts)", kind)
    return compiled


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
