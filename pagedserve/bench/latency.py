"""`pagedserve bench latency`: one batch of --batch-size random prompts of --input-len
tokens, --output-len forced output tokens, as vllm bench latency. Each iteration times a
max_tokens=1 run (prefill, plus one sampled token) and a full run on fresh prompts:

    prefill time         = t(max_tokens=1)
    decode time / token  = (t(full) - t(max_tokens=1)) / (output_len - 1)

Every timed run uses prompts never seen before, so the prefix cache cannot help."""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pagedserve.bench.datasets import random_requests
from pagedserve.bench.metrics import Distribution, distribution
from pagedserve.bench.throughput import engine_kwargs, forced_params, lora_requests


@dataclass
class LatencyResult:
    batch_size: int
    input_len: int
    output_len: int
    num_iters: int
    prefill_ms: Distribution          # per batch
    e2e_latency_ms: Distribution      # whole batch, output_len tokens each
    decode_ms_per_token: Distribution  # per decode step of the batch
    decode_tokens_per_s: float        # batch_size / mean decode step time


def decode_per_token(full_s: float, prefill_s: float, output_len: int) -> float:
    return (full_s - prefill_s) / (output_len - 1)


def run_latency(args: argparse.Namespace) -> LatencyResult:
    from pagedserve.llm import LLM
    if args.output_len < 2:
        from pagedserve.errors import ValidationError
        raise ValidationError("--output-len must be >= 2 to separate prefill from decode", "output_len")
    llm = LLM(**engine_kwargs(args))
    vocab = llm.engine.config.model.vocab_size
    prompt_sets = iter(range(10_000))

    def timed(max_tokens: int) -> float:
        batch = random_requests(args.batch_size, args.input_len, 1, seed=args.seed + 1000 * next(prompt_sets),
                                vocab_high=min(32000, vocab))
        start = time.perf_counter()
        llm.generate([r.offline_prompt() for r in batch], forced_params(max_tokens), use_tqdm=False,
                     lora_request=lora_requests(args, len(batch)))
        return time.perf_counter() - start

    try:
        for _ in range(args.num_iters_warmup):
            timed(1)
            timed(args.output_len)
        prefill, full = [], []
        for _ in range(args.num_iters):
            prefill.append(timed(1))
            full.append(timed(args.output_len))
    finally:
        llm.shutdown()
    per_token = [decode_per_token(f, p, args.output_len) for f, p in zip(full, prefill)]
    return LatencyResult(args.batch_size, args.input_len, args.output_len, args.num_iters,
                         distribution(prefill, args.percentiles), distribution(full, args.percentiles),
                         distribution(per_token, args.percentiles), args.batch_size / float(np.mean(per_token)))


def format_latency(r: LatencyResult) -> str:
    lines = [f"batch {r.batch_size}, input {r.input_len}, output {r.output_len}, {r.num_iters} iterations"]
    for label, dist in (("prefill (ms)", r.prefill_ms), ("end-to-end (ms)", r.e2e_latency_ms),
                        ("decode per token (ms)", r.decode_ms_per_token)):
        extra = "  ".join(f"{k} {v:.2f}" for k, v in dist.percentiles.items())
        lines.append(f"  {label:<22} mean {dist.mean:9.2f}  median {dist.median:9.2f}  {extra}")
    lines.append(f"  decode throughput      {r.decode_tokens_per_s:9.1f} tok/s (batch {r.batch_size})")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    from pagedserve.bench.results import default_filename, envelope, save_result
    result = run_latency(args)
    print(format_latency(result))
    report = envelope("latency", args, {"result": asdict(result)})
    filename = args.result_filename or args.output_json or (default_filename("latency") if args.save_result
                                                            else None)
    if filename:
        print(f"results written to {save_result(report, filename)}")
    return report
