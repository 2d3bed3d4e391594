"""Host cost of the grammar work per decode step, without a model: xgrammar's per-row
fill_next_token_bitmask loop vs its BatchGrammarMatcher (C++ thread pool) at several thread
counts, for N matchers of one JSON schema at staggered positions (the default model's tokenizer, 49,152 tokens).

    python benchmarks/grammar_fill.py [--rows 64] [--threads 1,2,4,8] [--tokenizer DIR]

Prints a table and one `RESULT {...}` JSON line (microseconds per step, best of --repeats)."""
from __future__ import annotations

import argparse
import json
import os
import time

import xgrammar

from pagedserve.core.structured_output import fill_bitmask


def _batch_fill(rows, buffer, threads: int):
    """xgrammar's batch matcher: one GIL-free call, rows filled on its C++ thread pool."""
    matcher = _MATCHERS.setdefault(threads, xgrammar.BatchGrammarMatcher(max_threads=threads))
    matcher.batch_fill_next_token_bitmask([row.grammar_matcher for row in rows], buffer)


_MATCHERS: dict = {}
from benchmarks.structured_overhead import SCHEMA


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--threads", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--tokenizer", default=None, help="a folder with tokenizer files (default: the default model's GGUF)")
    args = parser.parse_args()
    from transformers import AutoTokenizer
    from pagedserve.models.default_model import default_model_path
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        path = default_model_path()
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer)
    grammar = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    text = json.dumps({"name": "Ada Lovelace", "age": 36, "role": "admin",
                       "address": {"city": "London", "street": "St James's Square 12"},
                       "tags": ["math", "poetry"], "bio": "First programmer, wrote notes on the engine"})
    ids = tokenizer.encode(text, add_special_tokens=False)

    class Row:   # what fill_bitmask / accept_all read from a Request
        def __init__(self, i: int) -> None:
            self.grammar, self.grammar_matcher = grammar, xgrammar.GrammarMatcher(grammar)
            for token in ids[:i % len(ids)]:
                assert self.grammar_matcher.accept_token(token)

    rows = [Row(i) for i in range(args.rows)]
    buffer = xgrammar.allocate_token_bitmask(args.rows, info.vocab_size)
    result = {"rows": args.rows, "cpus": os.cpu_count()}
    result["fill_rows_us"] = _best(lambda: fill_bitmask(rows, buffer), args.repeats)
    reference = buffer.clone()
    for threads in [int(t) for t in args.threads.split(",")]:
        result[f"fill_batch{threads}_us"] = _best(lambda: _batch_fill(rows, buffer, threads), args.repeats)
        assert buffer.equal(reference), threads
    for key, value in result.items():
        print(f"{key:>20}: {value:.1f}" if isinstance(value, float) else f"{key:>20}: {value}")
    print("RESULT " + json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
