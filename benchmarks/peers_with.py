"""Run one of the peers' scripts (peers.py, peers_long.py) on pagedserve with engine arguments
of our choosing added to every LLM(...) it makes: an A/B of an engine default on the peers' own
workloads and timings, with no copy of their code. An argument the script passes itself is
overridden (this is for knobs they leave at the default).

    PYTHONPATH=$PWD python3 benchmarks/peers_with.py max_num_batched_tokens=16384 -- \\
        .devcarry/peers_long.py pagedserve llama-8b

Values are read as Python literals where they parse (16384, 0.9, True), else kept as strings.
Each RESULT line the script prints gains an "engine_kwargs" field naming the override."""
from __future__ import annotations

import ast
import json
import runpy
import sys


def parse_kwargs(items: list[str]) -> dict:
    kwargs = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw
    return kwargs


def install(kwargs: dict) -> None:
    """Every pagedserve.LLM(...) made from now on gets `kwargs` on top of its own; RESULT lines
    printed through print() carry them."""
    import builtins

    import pagedserve
    init = pagedserve.LLM.__init__

    def patched(self, model=None, **kw):
        init(self, model, **{**kw, **kwargs})

    pagedserve.LLM.__init__ = patched
    tag = json.dumps(kwargs)
    real_print = builtins.print

    def tagged_print(*args, **kw):
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("RESULT {"):
            args = (args[0][:-1] + f', "engine_kwargs": {tag}}}',)
        real_print(*args, **kw)

    builtins.print = tagged_print


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit(__doc__)
    cut = argv.index("--")
    kwargs, script = parse_kwargs(argv[:cut]), argv[cut + 1:]
    if not script:
        raise SystemExit("no script after --")
    install(kwargs)
    sys.argv = script
    runpy.run_path(script[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
