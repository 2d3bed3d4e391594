"""Cascade attention on a GPU (attention/triton_cascade.py): peers_long.py's prefix256 (256 x (2,048
shared + 64) tokens, 128 out, llama-8b, max_model_len 32768) with the cascade off and on in one
engine (TritonBackend.cascade flipped between generate calls; the model runner reads it every
step), in an order that puts each mode first and last; then the same tokens check: 64 rows sharing
a 1,024-token prefix, 48 greedy tokens each, the same prompts in both modes (the second run finds
every prompt cached: the decode steps are what differs), bf16 ids compared row by row.

Usage: PYTHONPATH=$PWD python3 benchmarks/cascade_gpu.py [ORDER] [--profile] [--mix]   (ORDER: 0 / 1, default 01100110)
--profile: then one prefix256 run each way under torch.profiler (prefix256_window.profiled_run: device busy, gaps,
and the top kernels by device time into $OUT/prefix256_cascade{0,1}_top.txt). The engine and the prefix256 runs are
prefix256_window.py's (make_engine, timed_run).
--mix: prefixmix instead, the cascade in mixed steps: 1,024 requests of one 2,048-token system prompt + 64 tokens,
output lengths U[16, 240], on an engine of max_num_seqs 256, so that rows finish at different steps and the requests
waiting take their places: most steps are mixed (a new prompt's 64-token chunk beside ~255 decode rows). Counts the
mixed steps and those that took the cascade; its same-tokens check: 384 requests (1,024 shared + 32, 8-48 tokens
out) on that engine, cached, run without the cascade twice (the noise: steps of other rows) and with it once.
PROMPTS=k (--mix): k system prompts, the requests taking them in turn (several groups a step); ORDER may then hold
g: the cascade for the largest group of a step only (session 54's one group a step, emulated)."""
import json
import os
import random
import sys
import time

import numpy as np

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", ".devcarry"), "/work/shared/bench"]

from pagedserve import SamplingParams  # noqa: E402
from pagedserve.attention.backend import TritonBackend  # noqa: E402
from benchmarks.prefix256_window import make_engine, profiled_run, timed_run  # noqa: E402


def shared(seed: int, n: int, prefix: int, suffix: int):
    rng = random.Random(seed)
    sysp = [rng.randrange(3, 32000) for _ in range(prefix)]
    return [{"prompt_token_ids": sysp + [rng.randrange(3, 32000) for _ in range(suffix)]} for _ in range(n)]


def mix_workload(seed: int, n: int = 1024, prefix: int = 2048, suffix: int = 64, out: tuple[int, int] = (16, 240),
                 num_prompts: int = 1):
    """Its own prompts each seed (no run hits another's cached prefix); the same output lengths.
    num_prompts system prompts, request i taking prompt i % num_prompts."""
    rng, lengths = random.Random(2000 + seed), random.Random(5)
    sysps = [[rng.randrange(3, 32000) for _ in range(prefix)] for _ in range(num_prompts)]
    prompts = [{"prompt_token_ids": sysps[i % num_prompts] + [rng.randrange(3, 32000) for _ in range(suffix)]}
               for i in range(n)]
    params = [SamplingParams(max_tokens=lengths.randint(*out), ignore_eos=True, temperature=0.0, detokenize=False)
              for _ in range(n)]
    return prompts, params


def mixed_steps_spy() -> dict:
    """Counts the steps that replay the mixed graphs, and those of them whose decode rows took the cascade."""
    from pagedserve.worker.mixed_graphs import MixedGraphs
    counts = {"mixed": 0, "mixed_cascade": 0}
    run_mixed = MixedGraphs.run

    def spy(self, inputs):
        counts["mixed"] += 1
        counts["mixed_cascade"] += bool(inputs.cascade_len)
        return run_mixed(self, inputs)
    MixedGraphs.run = spy
    return counts


def one_group_switch() -> dict:
    """Wraps the runner's shared_prefix: while switch["one"], a step's groups past the first (the
    largest) are dropped, their rows reading their whole context as without a cascade."""
    from pagedserve.attention import cascade_plan
    from pagedserve.worker import input_batch
    plan, switch = input_batch.shared_prefix, {"one": False}

    def first_group_only(*args):
        keys, arrays = plan(*args)
        if keys and switch["one"]:
            first = arrays["cascade_rows"][:arrays["cascade_groups"][1]]
            per_row = np.zeros_like(arrays["cascade_len"])
            per_row[first] = arrays["cascade_len"][first]
            keys, arrays = int(per_row.max()), cascade_plan.cascade_arrays(per_row, [first])
        return keys, arrays
    input_batch.shared_prefix = first_group_only
    return switch


def main_mix(order: str) -> None:
    """MAX_SEQS (default 256), MIX_N (requests, default 1,024), MIN_ROWS and MAX_GROUPS (cascade_plan's
    CASCADE_MIN_ROWS and CASCADE_MAX_GROUPS for this engine, its decode graphs included) and PROMPTS (system
    prompts, default 1) from the environment."""
    from benchmarks.prefix256_window import SMOKE
    from pagedserve.attention import cascade_plan
    if "MIN_ROWS" in os.environ:
        cascade_plan.CASCADE_MIN_ROWS = int(os.environ["MIN_ROWS"])
    if "MAX_GROUPS" in os.environ:   # a power of two (the prefix launch's group lanes)
        cascade_plan.CASCADE_MAX_GROUPS = int(os.environ["MAX_GROUPS"])
    llm = make_engine(max_num_seqs=int(os.environ.get("MAX_SEQS", "256")))
    counts = mixed_steps_spy()
    switch = one_group_switch()
    small = dict(n=64, prefix=256, suffix=16, out=(4, 24)) if SMOKE else {"n": int(os.environ.get("MIX_N", "1024"))}
    small["num_prompts"] = int(os.environ.get("PROMPTS", "1"))

    def run(seed: int) -> tuple[float, int]:
        prompts, params = mix_workload(seed, **small)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)
    TritonBackend.cascade = True
    run(99)   # warm-up
    walls, steps = {mode: [] for mode in "01g"}, {}
    for i, mode in enumerate(order):
        TritonBackend.cascade = mode != "0"
        switch["one"] = mode == "g"
        counts.update(mixed=0, mixed_cascade=0)
        dt, gen = run(i)
        walls[mode].append(dt)
        steps[mode] = dict(counts)
        print(f"prefixmix cascade={mode}: {gen} tokens in {dt:.3f} s ({gen / dt:,.0f} out tok/s), {counts['mixed']} "
              f"mixed steps, {counts['mixed_cascade']} with the cascade", flush=True)
    mean = {m: sum(v) / len(v) for m, v in walls.items() if v}
    print("RESULT " + json.dumps(dict(workload="prefixmix cascade A/B", order=order, tokens=gen,
                                      prompts=small["num_prompts"],
                                      wall_s={m: [round(x, 3) for x in v] for m, v in walls.items() if v},
                                      out_tok_s={m: round(gen / x, 1) for m, x in mean.items()}, steps=steps,
                                      speedup={m: round(mean["0"] / x, 3) for m, x in mean.items() if m != "0"}
                                      if "0" in mean else None)), flush=True)
    switch["one"] = False
    prompts, params = mix_workload(7, 384, 1024, 32, (8, 48), small["num_prompts"])
    ids = []
    for mode in "001":   # the first run caches every prompt
        TritonBackend.cascade = mode == "1"
        counts.update(mixed=0, mixed_cascade=0)
        ids.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    first = lambda a, b: [next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), len(r))   # noqa: E731
                          for r, s in zip(a, b)]
    total = sum(len(r) for r in ids[0])
    print("RESULT " + json.dumps(dict(workload="prefixmix same tokens", rows=len(prompts), tokens=total,
                                      mixed_steps=counts["mixed"], mixed_cascade_steps=counts["mixed_cascade"],
                                      identical_rows=sum(a == b for a, b in zip(ids[1], ids[2])),
                                      tokens_equal=sum(first(ids[1], ids[2])),
                                      noise_identical_rows=sum(a == b for a, b in zip(ids[0], ids[1])),
                                      noise_tokens_equal=sum(first(ids[0], ids[1])))), flush=True)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    order = args[0] if args else "01100110"
    if "--mix" in sys.argv:
        return main_mix(args[0] if args else "0110")
    llm = make_engine()
    greedy = lambda n: SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)  # noqa: E731
    TritonBackend.cascade = True
    timed_run(llm, 99)   # warm-up
    walls = {"0": [], "1": []}
    for i, mode in enumerate(order):
        TritonBackend.cascade = mode == "1"
        dt, gen = timed_run(llm, i)   # prefix256, its own prefix each run
        walls[mode].append(dt)
        print(f"prefix256 cascade={mode}: {gen} tokens in {dt:.3f} s ({gen / dt:,.0f} out tok/s)", flush=True)
    mean = {m: sum(v) / len(v) for m, v in walls.items() if v}
    print("RESULT " + json.dumps(dict(workload="prefix256 cascade A/B", order=order,
                                      wall_s={m: [round(x, 3) for x in v] for m, v in walls.items()},
                                      out_tok_s={m: round(256 * 128 / x, 1) for m, x in mean.items()},
                                      speedup=round(mean["0"] / mean["1"], 3) if len(mean) == 2 else None)),
          flush=True)
    prompts = shared(7, 64, 1024, 32)
    ids = {}
    for mode in ("0", "1"):
        TritonBackend.cascade = mode == "1"
        ids[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, [greedy(48)] * 64, use_tqdm=False)]
    same = sum(a == b for a, b in zip(ids["0"], ids["1"]))
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), 48) for a, b in zip(ids["0"], ids["1"])]
    print("RESULT " + json.dumps(dict(workload="cascade same tokens", rows=64, identical_rows=same,
                                      first_difference_min=min(first), tokens_equal=sum(first))), flush=True)
    if "--profile" in sys.argv:
        out_dir = os.environ.get("OUT", "/tmp")
        for mode in ("0", "1"):
            TritonBackend.cascade = mode == "1"
            print("RESULT " + json.dumps(dict(workload="prefix256 profiled", cascade=mode,
                                              **profiled_run(llm, 70 + int(mode), out_dir, f"cascade{mode}"))),
                  flush=True)


if __name__ == "__main__":
    main()
