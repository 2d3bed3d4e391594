"""Cascade attention on a GPU (attention/triton_cascade.py): peers_long.py's prefix256 (256 x (2,048
shared + 64) tokens, 128 out, llama-8b, max_model_len 32768) with the cascade off and on in one
engine (TritonBackend.cascade flipped between generate calls; the model runner reads it every
step), in an order that puts each mode first and last; then the same tokens check: 64 rows sharing
a 1,024-token prefix, 48 greedy tokens each, the same prompts in both modes (the second run finds
every prompt cached: the decode steps are what differs), bf16 ids compared row by row.

Usage: PYTHONPATH=$PWD python3 benchmarks/cascade_gpu.py [ORDER] [--profile]   (ORDER of 0 / 1, default 01100110)
--profile: then one prefix256 run each way under torch.profiler (prefix256_window.profiled_run: device busy, gaps,
and the top kernels by device time into $OUT/prefix256_cascade{0,1}_top.txt). The engine and the prefix256 runs are
prefix256_window.py's (make_engine, timed_run)."""
import json
import os
import random
import sys

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", ".devcarry"), "/work/shared/bench"]

from pagedserve import SamplingParams  # noqa: E402
from pagedserve.attention.backend import TritonBackend  # noqa: E402
from benchmarks.prefix256_window import make_engine, profiled_run, timed_run  # noqa: E402


def shared(seed: int, n: int, prefix: int, suffix: int):
    rng = random.Random(seed)
    sysp = [rng.randrange(3, 32000) for _ in range(prefix)]
    return [{"prompt_token_ids": sysp + [rng.randrange(3, 32000) for _ in range(suffix)]} for _ in range(n)]


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    order = args[0] if args else "01100110"
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
