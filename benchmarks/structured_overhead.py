"""Throughput of JSON-schema requests vs the same requests without a schema, offline engine.

Both runs generate the same number of tokens: the unconstrained run uses ignore_eos with each
request's max_tokens set to the token count its constrained twin produced, so the comparison
is wall time per generated token at equal work. The schema run includes grammar compilation
(one schema, compiled once: xgrammar's cache) and the per-step bitmask fill and masking.

Variants of the schema run (--variants, timed in turns with the plain run, best of --repeats):
  process the engine as is under async scheduling: accept and fill in the grammar process
          (core/grammar_process.py), the step sampled at the next engine call; the process
          takes each step's tokens from the device's copy as soon as the step is sampled
  inline  the same engine with in-engine matchers (InlineGrammars): accept on the engine
          thread as tokens are applied, one xgrammar batch fill right before sampling
In lockstep (the CPU default) every variant is in-engine at schedule time (one batch fill).
The engine runs without a host KV tier (swap_space 0: its background pinning is noise here).
Every variant must give the same token ids (the masks are the same); `ids_equal` says so.
Validity: json.loads, and jsonschema.validate against the schema where jsonschema is installed.

    python benchmarks/structured_overhead.py                       # CPU, default model
    python benchmarks/structured_overhead.py --device cuda --dtype bfloat16
    python benchmarks/structured_overhead.py --device cuda --dtype bfloat16 --model DIR --load-format dummy
        (DIR: a config.json and the default model's tokenizer files; random weights)
    python benchmarks/structured_overhead.py --cpu-smoke --model DIR
        (a tiny random llama with DIR's tokenizer, async scheduling, 8 requests: proves the script runs)

Prints one `RESULT {...}` JSON line.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import tempfile
import time

from pagedserve import LLM, SamplingParams, StructuredOutputsParams
from pagedserve.core import structured_output

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


KNOWN = ("process", "inline")


def _tiny_model(tokenizer_dir: str) -> str:
    """A 2-layer llama (vocab 49,152) with `tokenizer_dir`'s tokenizer files, for --cpu-smoke."""
    path = tempfile.mkdtemp(prefix="structured_smoke_")
    for name in os.listdir(tokenizer_dir):
        if name != "config.json" and not name.endswith((".safetensors", ".bin", ".gguf")):
            shutil.copy(os.path.join(tokenizer_dir, name), path)
    config = json.load(open(os.path.join(tokenizer_dir, "config.json")))
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16)
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    return path


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
    parser.add_argument("--variants", default="process,inline", help=f"schema-run variants: {', '.join(KNOWN)}")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="a tiny random llama with --model's tokenizer on CPU, async scheduling, 8 requests")
    parser.add_argument("--no-register", action="store_true",
                        help="stage the grammar process's mask through the runner's pinned copy (no cudaHostRegister)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed runs, one schema run under cProfile: the top host functions")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in KNOWN]
    if unknown:
        parser.error(f"unknown variants {unknown}: {KNOWN}")
    if args.no_register:   # (worker/grammar_mask.py; model_runner.py in older trees)
        try:
            from pagedserve.worker import grammar_mask as owner
        except ImportError:
            from pagedserve.worker import model_runner as owner
        owner.REGISTER_GRAMMAR_MASK = False
    kwargs = {"model": args.model} if args.model else {}
    if args.cpu_smoke:
        kwargs = {"model": _tiny_model(args.model), "async_scheduling": True}
        args.device, args.dtype, args.load_format, args.num_requests = "cpu", "float32", "dummy", 8
    llm = LLM(device=args.device, dtype=args.dtype, max_model_len=1024, load_format=args.load_format, swap_space=0,
              **kwargs)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Invent user number {i} as a JSON record with a long bio."}],
        tokenize=False, add_generation_prompt=True) for i in range(args.num_requests)]
    structured = SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                structured_outputs=StructuredOutputsParams(json=SCHEMA))
    llm.generate(prompts[:2], structured, use_tqdm=False)   # warm-up: compile, first-step costs, the process
    scheduler = llm.engine.core.scheduler
    lockstep = getattr(scheduler.grammars, "process", None) is None   # in-engine at schedule time
    backends = {"process": scheduler.grammars, "inline": structured_output.InlineGrammars()}
    waits = {}   # variant -> the grammar process's counters over its last schema run

    def run(params, variant: str = "process") -> tuple[float, list]:
        process = None if lockstep else getattr(backends[variant], "process", None)
        before = _counters(process)
        if not lockstep:
            scheduler.grammars = backends[variant]
        try:
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - start, outs
        finally:
            if not lockstep:
                scheduler.grammars = backends["process"]
            process = process or getattr(backends[variant], "process", None)   # started by this run
            if process is not None and isinstance(params, SamplingParams):   # the schema run
                waits[variant] = {k: v - before.get(k, 0) for k, v in _counters(process).items()}

    _, outs = run(structured)   # untimed: the token counts for the plain run, first-shape costs
    reference_ids = [o.outputs[0].token_ids for o in outs]
    tokens = sum(len(ids) for ids in reference_ids)
    plain = [SamplingParams(max_tokens=len(ids), temperature=0.0, ignore_eos=True) for ids in reference_ids]
    times = {kind: [] for kind in ["plain", *variants]}
    last = {}
    for _ in range(args.repeats):   # in turns, so that a slow spell of the host hits every kind
        for kind in times:
            seconds, last[kind] = run(plain) if kind == "plain" else run(structured, kind)
            times[kind].append(seconds)
    best = {kind: min(values) for kind, values in times.items()}
    median = {kind: sorted(values)[len(values) // 2] for kind, values in times.items()}
    assert sum(len(o.outputs[0].token_ids) for o in last["plain"]) == tokens
    result = {
        "device": args.device, "dtype": args.dtype, "model": args.model or "default (SmolLM2-135M-Instruct)",
        "cpu_smoke": args.cpu_smoke, "num_requests": args.num_requests, "generated_tokens": tokens,
        "repeats": args.repeats, "plain_tok_s": round(tokens / best["plain"], 1),
        "plain_median_tok_s": round(tokens / median["plain"], 1), "variants": {},
        "grammar_process": not lockstep, "mask_registered": _mask_registered(llm),
    }
    for variant, counters in waits.items():   # per step of its last run: the engine thread's spin,
        count = counters.pop("waits")           # the window from post to wait, the process's parts
        if count and variant in variants:
            result[f"{variant}_wait_us"] = round(counters.pop("wait_s") / count * 1e6, 1)
            result[f"{variant}_per_step_us"] = {k: round(v / count * 1e6, 1) for k, v in counters.items()}
    for variant in variants:
        outs = last[variant]
        texts = [o.outputs[0].text for o in outs]
        result["variants"][variant] = {
            "tok_s": round(tokens / best[variant], 1),
            "overhead_pct": round(100 * (best[variant] / best["plain"] - 1), 1),
            "median_tok_s": round(tokens / median[variant], 1),
            "median_overhead_pct": round(100 * (median[variant] / median["plain"] - 1), 1),
            "ids_equal": [o.outputs[0].token_ids for o in outs] == reference_ids,
            "valid_json": sum(_json_error(t) == "" for t in texts),
            "schema_valid": _schema_valid(texts),
            "finish_reasons": dict(collections.Counter(o.outputs[0].finish_reason for o in outs)),
            "an_invalid_output": next(([o.outputs[0].text[-120:], o.error, _json_error(o.outputs[0].text)]
                                       for o in outs if _json_error(o.outputs[0].text)), None),
        }
    print("RESULT " + json.dumps(result), flush=True)
    for variant, figures in result["variants"].items():
        print(f"{variant:>8}: {figures['tok_s']:>10.1f} tok/s vs plain {result['plain_tok_s']:.1f}: "
              f"overhead {figures['overhead_pct']:5.1f}% (medians {figures['median_overhead_pct']:5.1f}%)  "
              f"ids_equal {figures['ids_equal']}  "
              f"json {figures['valid_json']}/{args.num_requests}  schema {figures['schema_valid']}  "
              f"{figures['finish_reasons']}", flush=True)
    for backend in backends.values():
        if backend is not scheduler.grammars:
            backend.shutdown()
    if args.profile:
        import cProfile
        import pstats
        profiler = cProfile.Profile()
        profiler.runcall(run, structured)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def _counters(process) -> dict[str, float]:
    """The grammar process's running totals (seconds): the engine's waits, post-to-wait windows,
    and the process's time waiting for tokens, accepting and filling."""
    if process is None:
        return {}
    from pagedserve.core.grammar_process import NS_ACCEPT, NS_FILL, NS_TOKENS
    header = process.layout.header
    return {"waits": process.waits, "wait_s": process.wait_seconds, "window": process.window_seconds,
            "tokens": header[NS_TOKENS] * 1e-9, "accept": header[NS_ACCEPT] * 1e-9, "fill": header[NS_FILL] * 1e-9}


def _mask_registered(llm) -> bool | None:
    """On CUDA: whether the runner page-locked the grammar process's mask in place (no staging)."""
    runner = getattr(llm.engine.core.executor, "runner", None)
    if hasattr(runner, "grammar_mask"):
        return runner.grammar_mask.registered
    held = getattr(runner, "_registered_mask", None)   # older trees
    return None if held is None else held[2]


def _json_error(text: str) -> str:
    try:
        json.loads(text)
        return ""
    except ValueError as exc:
        return f"{exc} near {text[max(0, exc.pos - 40):exc.pos + 40]!r}" if hasattr(exc, "pos") else str(exc)


def _schema_valid(texts: list[str]) -> int | str:
    """How many texts are JSON that jsonschema validates against SCHEMA."""
    try:
        import jsonschema
    except ImportError:
        return "jsonschema not installed"
    valid = 0
    for text in texts:
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return valid


if __name__ == "__main__":
    main()
