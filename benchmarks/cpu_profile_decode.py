"""Issue 19: where a batch-1 decode step of the default model goes on the CPU (torch.profiler
over the decode steps of one 128-token prompt): aten calls per step, the ops by self CPU
time, and the share of the step outside aten ops (Python, scheduler, sampler glue).

Usage: PYTHONPATH=. python benchmarks/cpu_profile_decode.py [--dtype auto|float32] [--threads N]
       [--steps N] [--out FILE.json]"""
import argparse
import json
import os
import random
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
from pagedserve import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(max_model_len=1024, seed=0, dtype=args.dtype)
    rng = random.Random(0)
    prompt = {"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(128)]}

    def gen(n):
        return llm.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False),
                            use_tqdm=False)
    gen(8)
    t0 = time.perf_counter()
    gen(1)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gen(args.steps + 1)
    wall = time.perf_counter() - t0 - prefill
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e3
    calls = sum(e.count for e in events if e.key.startswith("aten::"))
    top = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)[:15]
    per_step_ms = wall / args.steps * 1e3
    result = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), dtype=args.dtype, threads=args.threads,
                  load_average_1m=round(os.getloadavg()[0], 2), steps=args.steps,
                  step_ms_profiled=round(per_step_ms, 2), aten_calls_per_step=round(calls / args.steps),
                  aten_self_ms_per_step=round(total_self / args.steps, 2),
                  outside_aten_pct=round(100 * (1 - total_self / (wall * 1e3)), 1),
                  top_ops=[dict(op=e.key, calls_per_step=round(e.count / args.steps, 1),
                                self_ms_per_step=round(e.self_cpu_time_total / 1e3 / args.steps, 3),
                                pct_of_aten=round(100 * e.self_cpu_time_total / 1e3 / total_self, 1)) for e in top])
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
