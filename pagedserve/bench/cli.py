"""`pagedserve bench throughput | latency | serve`. Flag names follow `vllm bench` wherever
the concept is the same. Only argparse here; each benchmark imports its engine lazily."""
from __future__ import annotations

import argparse
from typing import Any

from pagedserve.errors import ValidationError


def _add_dataset_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset-name", default=default_name,
                       choices=["random", "peers", "random-text", "sharegpt", "prefix_repetition"],
                       help="random: token ids; peers: ../shared/bench/peers.py's workload (input U[64,1024], "
                            "output U[16,512]); random-text: decoded random tokens; sharegpt: --dataset-path; "
                            "prefix_repetition: token ids, several shared prefixes (vLLM's)")
    group.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file")
    group.add_argument("--num-prompts", type=int, default=64)
    group.add_argument("--random-input-len", type=int, default=256)
    group.add_argument("--random-output-len", type=int, default=64)
    group.add_argument("--random-range-ratio", type=float, default=0.0,
                       help="lengths drawn uniformly from [L*(1-r), L*(1+r)]")
    group.add_argument("--random-prefix-len", type=int, default=0,
                       help="random: this many token ids every prompt begins with (a shared system prompt), "
                            "before its own --random-input-len")
    group.add_argument("--prefix-repetition-prefix-len", type=int, default=256,
                       help="prefix_repetition: each prefix's token ids (a system prompt)")
    group.add_argument("--prefix-repetition-suffix-len", type=int, default=256,
                       help="prefix_repetition: each prompt's own token ids after its prefix")
    group.add_argument("--prefix-repetition-num-prefixes", type=int, default=10,
                       help="prefix_repetition: the prefixes; --num-prompts // this many prompts each")
    group.add_argument("--prefix-repetition-output-len", type=int, default=128)
    group.add_argument("--sharegpt-output-len", type=int, default=None,
                       help="override the gpt turn's token count as output length")
    group.add_argument("--seed", type=int, default=0)


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    group.add_argument("--tokenizer", default=None)
    group.add_argument("--dtype", default="auto")
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--max-num-seqs", type=int, default=None)
    group.add_argument("--max-num-batched-tokens", type=int, default=None)
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--load-format", default="auto", help="auto, safetensors, pt, gguf or dummy")
    group.add_argument("--skip-tokenizer-init", action="store_true")
    group.add_argument("--device", default="auto")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    group.add_argument("--enforce-eager", action="store_true")
    group.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    group.add_argument("--kv-cache-memory-gb", type=float, default=None)
    group.add_argument("--num-kv-blocks", type=int, default=None)
    group.add_argument("--enable-lora", action="store_true")
    group.add_argument("--max-loras", type=int, default=1)
    group.add_argument("--max-lora-rank", type=int, default=16)
    group.add_argument("--lora-path", default=None,
                       help="a PEFT adapter folder: each request runs it under one of --max-loras ids, drawn at "
                            "random as vLLM's benchmark does (implies --enable-lora)")


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--save-result", action="store_true", help="write the JSON result (default file name)")
    group.add_argument("--result-filename", default=None, help="write the JSON result here")
    group.add_argument("--disable-tqdm", action="store_true")
    group.add_argument("--metric-percentiles", default="90,99", help="comma-separated, e.g. 50,90,99")


def add_throughput_arguments(parser: argparse.ArgumentParser) -> None:
    _add_dataset_arguments(parser, "random")
    _add_engine_arguments(parser)
    _add_output_arguments(parser)
    parser.add_argument("--output-json", default=None, help="same as --result-filename (vllm bench throughput)")
    parser.add_argument("--backend", default="pagedserve", choices=["pagedserve", "hf", "both"],
                        help="hf: transformers' static batched generate on the same prompts")
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--scheduling", default="continuous", choices=["continuous", "static", "both"],
                        help="both: the two policies on the same prompts, with the ratio")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="KV blocks in use over time")
    parser.add_argument("--save-kv-samples", action="store_true", help="per-step KV samples in the JSON")


def add_latency_arguments(parser: argparse.ArgumentParser) -> None:
    _add_engine_arguments(parser)
    _add_output_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None, help="same as --result-filename")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters", type=int, default=5)
    parser.add_argument("--num-iters-warmup", type=int, default=1)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    _add_dataset_arguments(parser, "random")
    _add_output_arguments(parser)
    parser.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000 (else --host/--port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--endpoint", default=None, help="override the backend's path, e.g. /v1/completions")
    parser.add_argument("--backend", default="openai", choices=["openai", "openai-chat", "tgi"])
    parser.add_argument("--model", default=None, help="model name sent in requests (default: the first of "
                                                      "/v1/models); also the tokenizer source when needed")
    parser.add_argument("--served-model-name", default=None, help="model name sent in requests")
    parser.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME",
                        help="LoRA adapters the server serves (its --lora-modules names): each request names one, "
                             "drawn at random (seeded), as vLLM's bench serve; TGI: parameters.adapter_id")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for text datasets and text backends")
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    parser.add_argument("--request-rate", default="inf",
                        help="requests/s: inf (all at once), R (Poisson), or several: 1,2,4")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of inter-arrival times: 1 = Poisson, <1 burstier, >1 steadier")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true", help="force output lengths (vLLM/pagedserve)")
    parser.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                        help="SLOs, e.g. ttft:500 tpot:50 e2el:2000")
    parser.add_argument("--skip-initial-test", action="store_true")
    parser.add_argument("--save-detailed", action="store_true", help="per-request timings in the JSON")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="latency CDFs; with several rates also FILE_throughput.png")


SUBCOMMANDS = {
    "throughput": ("offline throughput over a dataset (static vs continuous, vs transformers)",
                   add_throughput_arguments, "pagedserve.bench.throughput"),
    "latency": ("prefill and per-token decode time of one batch", add_latency_arguments,
                "pagedserve.bench.latency"),
    "serve": ("load-test a running OpenAI or TGI server", add_serve_arguments, "pagedserve.bench.serve"),
}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """`bench`'s own subcommands, under the top-level `pagedserve bench`."""
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))


def run_bench(args: argparse.Namespace) -> Any:
    import importlib
    try:
        args.percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    except ValueError:
        raise ValidationError(f"--metric-percentiles takes numbers, got {args.metric_percentiles!r}",
                              "metric_percentiles") from None
    module = importlib.import_module(SUBCOMMANDS[args.bench_command][2])
    return module.main(args)


def main(argv: list[str] | None = None) -> Any:
    """`python -m pagedserve.bench.cli throughput ...` without the top-level CLI."""
    parser = argparse.ArgumentParser(prog="pagedserve bench")
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    main()
