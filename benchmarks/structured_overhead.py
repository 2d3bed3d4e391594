"""Throughput of JSON-schema requests vs the same requests without a schema, offline engine.

Both runs generate the same number of tokens: the unconstrained run uses ignore_eos with each
request's max_tokens set to the token count its constrained twin produced, so the comparison
is wall time per generated token at equal work. The schema run includes grammar compilation
(one schema, compiled once: xgrammar's cache) and the per-step bitmask fill and masking.

    python benchmarks/structured_overhead.py                       # CPU, default model
    python benchmarks/structured_overhead.py --device cuda --dtype bfloat16
    python benchmarks/structured_overhead.py --device cuda --dtype bfloat16 --model DIR --load-format dummy
        (DIR: a config.json and the default model's tokenizer files; random weights)

Prints one `RESULT {...}` JSON line.
"""
from __future__ import annotations

import argparse
import collections
import json
import time

from pagedserve import LLM, SamplingParams, StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                     "street": {"type": "string", "maxLength": 40}},
                    "required": ["city", "street"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 6},
        "bio": {"type": "string", "maxLength": 80},
    },
    "required": ["name", "age", "role", "address", "tags", "bio"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--load-format", default="auto",
                        help="dummy: random weights at the folder's config (a GPU-sized model with a real tokenizer)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each kind (best is kept)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed runs, one schema run under cProfile: the top host functions")
    args = parser.parse_args()
    kwargs = {"model": args.model} if args.model else {}
    llm = LLM(device=args.device, dtype=args.dtype, max_model_len=1024, load_format=args.load_format, **kwargs)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Invent user number {i} as a JSON record with a long bio."}],
        tokenize=False, add_generation_prompt=True) for i in range(args.num_requests)]
    structured = SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                structured_outputs=StructuredOutputsParams(json=SCHEMA))
    llm.generate(prompts[:2], structured, use_tqdm=False)   # warm-up: compile, first-step costs

    def run(params) -> tuple[float, int, list]:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs), outs

    best_structured, best_plain = float("inf"), float("inf")
    for _ in range(args.repeats):
        seconds, tokens, outs = run(structured)
        best_structured = min(best_structured, seconds)
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        plain = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
        plain_seconds, plain_tokens, _ = run(plain)
        best_plain = min(best_plain, plain_seconds)
        assert plain_tokens == tokens
    valid = sum(_parses(o.outputs[0].text) for o in outs)
    result = {
        "device": args.device, "dtype": args.dtype, "model": args.model or "default (SmolLM2-135M-Instruct)",
        "num_requests": args.num_requests, "generated_tokens": tokens, "valid_json": valid,
        "finish_reasons": dict(collections.Counter(o.outputs[0].finish_reason for o in outs)),
        "an_invalid_output": next(([o.outputs[0].text[-120:], o.error] for o in outs
                                   if not _parses(o.outputs[0].text)), None),
        "structured_tok_s": round(tokens / best_structured, 1), "plain_tok_s": round(tokens / best_plain, 1),
        "overhead_pct": round(100 * (best_structured / best_plain - 1), 1),
    }
    print("RESULT " + json.dumps(result), flush=True)
    if args.profile:
        import cProfile
        import pstats
        profiler = cProfile.Profile()
        profiler.runcall(run, structured)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def _json_error(text: str) -> str:
    try:
        json.loads(text)
        return ""
    except ValueError as exc:
        return f"{exc} near {text[max(0, exc.pos - 40):exc.pos + 40]!r}" if hasattr(exc, "pos") else str(exc)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
