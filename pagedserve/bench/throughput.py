"""`pagedserve bench throughput`: the offline engine over a dataset with forced output
lengths (ignore_eos, greedy), under the continuous and/or static scheduling policy, and
optionally transformers' static batched generate on the same prompts. Prints requests/s and
input, output and total tokens/s, the KV memory report, and the same-run ratios."""
from __future__ import annotations

import argparse
import gc
import random
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from pagedserve.bench.datasets import SampleRequest, load_requests, random_requests
from pagedserve.bench.memory import KVSample, KVUsageProbe, format_kv_report, kv_memory_report

logger = logging.getLogger(__name__)

# bench flag (argparse dest) -> LLM() keyword
ENGINE_FLAGS = ("model", "tokenizer", "dtype", "max_model_len", "block_size", "max_num_seqs",
                "max_num_batched_tokens", "enable_prefix_caching", "seed", "load_format", "skip_tokenizer_init",
                "device", "gpu_memory_utilization", "enforce_eager", "tensor_parallel_size", "kv_cache_memory_gb",
                "num_kv_blocks", "enable_lora", "max_loras", "max_lora_rank")


@dataclass
class ThroughputResult:
    label: str                      # "pagedserve continuous", "pagedserve static", "transformers"
    num_requests: int
    elapsed_s: float
    total_input_tokens: int
    total_output_tokens: int
    requests_per_s: float
    input_tokens_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    kv_memory: dict | None = None
    extra: dict = field(default_factory=dict)


def make_result(label: str, requests: Sequence[SampleRequest], elapsed_s: float, output_tokens: int,
                **extra: Any) -> ThroughputResult:
    input_tokens = sum(r.prompt_len for r in requests)
    return ThroughputResult(label, len(requests), elapsed_s, input_tokens, output_tokens,
                            len(requests) / elapsed_s, input_tokens / elapsed_s, output_tokens / elapsed_s,
                            (input_tokens + output_tokens) / elapsed_s, extra=extra)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {name: getattr(args, name) for name in ENGINE_FLAGS if hasattr(args, name)}
    if getattr(args, "lora_path", None):
        kwargs["enable_lora"] = True
    return kwargs


def lora_requests(args: argparse.Namespace, count: int) -> list | None:
    """--lora-path: each request's adapter, one of --max-loras ids of that folder drawn at random
    (seeded), as vLLM's throughput benchmark does; None without it."""
    if not getattr(args, "lora_path", None):
        return None
    from pagedserve.lora_request import LoRARequest
    rng = random.Random(args.seed)
    adapters = [LoRARequest(f"lora{i}", i, args.lora_path) for i in range(1, args.max_loras + 1)]
    return [rng.choice(adapters) for _ in range(count)]


def forced_params(output_len: int) -> Any:
    from pagedserve.sampling_params import SamplingParams
    return SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0, detokenize=False)


def run_pagedserve(args: argparse.Namespace, requests: Sequence[SampleRequest], policy: str,
                   vocab_size: int) -> tuple[ThroughputResult, list[KVSample]]:
    """Build an engine with `policy`, warm it up on unrelated prompts (so no prefix-cache
    hit helps the timed run), time one generate() over every request, release the engine."""
    from pagedserve.llm import LLM
    llm = LLM(**engine_kwargs(args), scheduling_policy=policy)
    try:
        warm = random_requests(2, 16, 4, seed=args.seed + 1, vocab_high=min(32000, vocab_size))
        llm.generate([r.offline_prompt() for r in warm], [forced_params(4)] * 2, use_tqdm=False)
        core = llm.engine.core
        probe = KVUsageProbe(core.scheduler).install()
        start = time.perf_counter()
        loras = lora_requests(args, len(requests))
        outputs = llm.generate([r.offline_prompt() for r in requests], [forced_params(r.output_len) for r in requests],
                               use_tqdm=not args.disable_tqdm, lora_request=loras)
        elapsed = time.perf_counter() - start
        probe.remove()
        output_tokens = [len(o.outputs[0].token_ids) for o in outputs]
        lengths = [len(o.prompt_token_ids) + n for o, n in zip(outputs, output_tokens)]
        report = kv_memory_report(lengths, core.config.cache.block_size, core.config.scheduler.max_model_len,
                                  core.num_kv_blocks, probe.samples)
        capped = sum(n < r.output_len for n, r in zip(output_tokens, requests))
        extra = {} if loras is None else {"lora_requests": dict(Counter(lora.lora_name for lora in loras))}
        result = make_result(f"pagedserve {policy}", requests, elapsed, sum(output_tokens), scheduling=policy,
                             num_steps=len(probe.samples), length_capped_requests=capped, **extra)
        result.kv_memory = report.to_dict()
        return result, probe.samples
    finally:
        llm.shutdown()
        del llm
        gc.collect()


def run_transformers(args: argparse.Namespace, requests: Sequence[SampleRequest], source: Any,
                     dtype: Any, device: str, tokenizer: Any | None) -> ThroughputResult:
    from pagedserve.bench.hf_baseline import load_hf_model, run_hf
    model = load_hf_model(source, dtype, device, args.load_format)
    try:
        run = run_hf(model, requests, args.hf_batch_size, device, tokenizer)
    finally:
        del model
        gc.collect()
    return make_result("transformers", requests, run.elapsed_s, run.useful_output_tokens,
                       batch_size=run.batch_size, generated_tokens_incl_padding=run.generated_tokens)


def format_result(r: ThroughputResult) -> str:
    return (f"{r.label:<24} {r.elapsed_s:8.2f} s  {r.requests_per_s:7.2f} req/s  "
            f"in {r.input_tokens_per_s:9.1f} tok/s  out {r.output_tokens_per_s:8.1f} tok/s  "
            f"total {r.total_tokens_per_s:9.1f} tok/s")


def ratios(results: Sequence[ThroughputResult]) -> dict[str, float]:
    """Same-run output-throughput ratios: continuous / static and pagedserve / transformers."""
    by_label = {r.label: r.output_tokens_per_s for r in results}
    out: dict[str, float] = {}
    if "pagedserve continuous" in by_label and "pagedserve static" in by_label:
        out["continuous_over_static"] = by_label["pagedserve continuous"] / by_label["pagedserve static"]
    if "transformers" in by_label:
        for label in ("pagedserve continuous", "pagedserve static"):
            if label in by_label:
                out[f"{label.split()[1]}_over_transformers"] = by_label[label] / by_label["transformers"]
    return out


def main(args: argparse.Namespace) -> dict[str, Any]:
    from pagedserve.bench.results import default_filename, envelope, save_result
    from pagedserve.engine_args import EngineArgs
    from pagedserve.models.loader import load_tokenizer

    if getattr(args, "lora_path", None) and args.backend != "pagedserve":
        from pagedserve.errors import ValidationError
        raise ValidationError("--lora-path runs the pagedserve backend only (--backend pagedserve)", "lora_path")
    config, _, source = EngineArgs.from_kwargs(**engine_kwargs(args)).create_config(offline=True)
    tokenizer = None
    if args.dataset_name in ("random-text", "sharegpt") and not args.skip_tokenizer_init:
        tokenizer = load_tokenizer(source, args.tokenizer)
    requests = load_requests(args, tokenizer, config.model.vocab_size, config.scheduler.max_model_len)
    print(f"{len(requests)} requests: {sum(r.prompt_len for r in requests)} prompt tokens, "
          f"{sum(r.output_len for r in requests)} output tokens requested")
    policies = ["continuous", "static"] if args.scheduling == "both" else [args.scheduling]
    results, series = [], {}
    if args.backend in ("pagedserve", "both"):
        for policy in policies:
            result, samples = run_pagedserve(args, requests, policy, config.model.vocab_size)
            results.append(result)
            series[result.label] = samples
            print(format_result(result))
            print(format_kv_report(kv_memory_report_from(result)))
    if args.backend in ("hf", "both"):
        result = run_transformers(args, requests, source, config.model.dtype, config.device.device,
                                  tokenizer)
        results.append(result)
        print(format_result(result))
    same_run = ratios(results)
    for name, value in same_run.items():
        print(f"{name.replace('_', ' ')}: {value:.2f}x (output tokens/s, same run)")
    if args.plot and series:
        from pagedserve.bench.plots import plot_kv_blocks
        plot_kv_blocks(series, next(iter(results)).kv_memory["num_kv_blocks"], args.plot)
        print(f"plot written to {args.plot}")
    report = envelope("throughput", args, {"results": [asdict(r) for r in results], "ratios": same_run,
                                           "kv_samples": {k: [asdict(s) for s in v] for k, v in series.items()}
                                           if args.save_kv_samples else None})
    filename = args.result_filename or args.output_json or (default_filename("throughput") if args.save_result
                                                            else None)
    if filename:
        print(f"results written to {save_result(report, filename)}")
    return report


def kv_memory_report_from(result: ThroughputResult) -> Any:
    from pagedserve.bench.memory import KVMemoryReport
    return KVMemoryReport(**result.kv_memory)
