"""`pagedserve <command>`: one argparse subparser per command. A command is a module-level
pair (add its arguments, run it); add new ones to COMMANDS (e.g. `bench`)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NamedTuple

from pagedserve.bench.cli import add_bench_arguments, run_bench
from pagedserve.errors import PagedServeError
from pagedserve.logger import configure_default_logging
from pagedserve.server.engine_flags import add_engine_arguments, engine_kwargs
from pagedserve.server.run_batch import add_run_batch_arguments, run_batch
from pagedserve.server.serve import add_serve_arguments, run_server


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], object]
    run: Callable[[argparse.Namespace], object]


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", metavar="PROMPT")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None, help="the sampling seed")
    add_engine_arguments(parser.add_argument_group("engine"), exclude=("seed",))   # --seed is the sampling seed


def _run_generate(args: argparse.Namespace) -> None:
    from pagedserve.llm import LLM
    from pagedserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    kwargs = engine_kwargs(args)
    kwargs.pop("seed", None)   # --seed here is the sampling seed, not the engine's
    llm = LLM(**kwargs)
    try:
        output = llm.generate([args.prompt], params, use_tqdm=False)[0]
    finally:
        llm.shutdown()
    print(output.outputs[0].text)


COMMANDS: dict[str, Command] = {
    "serve": Command("serve a model over an OpenAI-compatible HTTP API", add_serve_arguments, run_server),
    "generate": Command("complete one prompt offline and print the text", _add_generate_arguments, _run_generate),
    "bench": Command("benchmark throughput, latency or a running server", add_bench_arguments, run_bench),
    "run-batch": Command("run an OpenAI batch file (JSONL) offline, as vLLM's run-batch", add_run_batch_arguments,
                         run_batch),
}


def build_parser() -> argparse.ArgumentParser:
    from pagedserve import __version__
    parser = argparse.ArgumentParser(prog="pagedserve", description="LLM inference engine and server.")
    parser.add_argument("--version", action="version", version=f"pagedserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_default_logging()
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except PagedServeError as exc:
        param = getattr(exc, "param", None)
        print(f"pagedserve {args.command}: error: {exc}" + (f" (parameter: {param})" if param else ""),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
