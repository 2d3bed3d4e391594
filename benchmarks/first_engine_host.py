"""Issue 22, thr512's first engine: before each of the first engine's ~35 prefill steps the GPU
waits 2-5 ms for the host (~70 ms a run), and never in a later engine of the same process
(thr_spread.py, session 18). What is the host doing that only a first engine pays? llama-1b
(peers.py's set-up and workload), two engines in one process: each one's first `--steps` core
steps of the timed thr512 run under cProfile; prints each engine's top functions by own time and
the functions whose own time differs most between the two.

Usage: PYTHONPATH=$PWD python3 benchmarks/first_engine_host.py OUT [--steps 12]"""
from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import sys
import time

sys.path[:0] = [".devcarry"]

import torch  # noqa: E402


def one_engine(label: str, steps: int, torch_profile: bool = False) -> dict:
    from peers import make_model_dir, workload
    from pagedserve import LLM, SamplingParams
    llm = LLM(model=make_model_dir("llama-1b"), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=2048, gpu_memory_utilization=0.85, seed=0)
    reqs = workload(512)
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    sps = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0, detokenize=False) for _, o in reqs]
    llm.generate(prompts[:8], sps[:8], use_tqdm=False)
    core = llm.engine.core
    step = core.step
    prof = cProfile.Profile()
    if torch_profile:   # the CUDA runtime calls under the host's time instead (cudaMalloc, syncs, launches)
        from torch.profiler import ProfilerActivity, profile
        prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
        prof.enable = prof.start
        prof.disable = prof.stop
        started = [False]
    count = [0]
    walls: list[float] = []

    def profiled_step(*args, **kwargs):
        if count[0] >= steps:
            return step(*args, **kwargs)
        count[0] += 1
        t0 = time.perf_counter()
        if not torch_profile:
            prof.enable()
        elif not started[0]:
            started[0] = True
            prof.start()
        try:
            return step(*args, **kwargs)
        finally:
            if not torch_profile:
                prof.disable()
            elif count[0] == steps:
                prof.stop()
            walls.append(round((time.perf_counter() - t0) * 1e3, 2))

    core.step = profiled_step
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    dt = time.perf_counter() - t0
    core.step = step
    if torch_profile:
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::mm"]
        rows.sort(key=lambda e: -e.self_cpu_time_total)
        table += "\n" + "\n".join(f"  mm {e.input_shapes}: {e.count} calls, self {e.self_cpu_time_total / e.count:.1f} us"
                                  for e in rows[:25])
        print(f"== {label}: thr512 {sum(len(o.outputs[0].token_ids) for o in outs) / dt:.0f} out tok/s; "
              f"profiled step walls ms {walls}\n{table}", flush=True)
        llm.shutdown()
        return dict(walls=walls, own={})
    stats = pstats.Stats(prof)
    own = {}
    for (path, line, fn), (cc, nc, tt, ct, callers) in stats.stats.items():
        own[f"{os.path.basename(path)}:{line}:{fn}"] = (round(tt * 1e3, 2), nc)
    top = sorted(own.items(), key=lambda kv: -kv[1][0])[:30]
    print(f"== {label}: thr512 {sum(len(o.outputs[0].token_ids) for o in outs) / dt:.0f} out tok/s; "
          f"profiled step walls ms {walls}", flush=True)
    for name, (ms, calls) in top:
        print(f"  {ms:9.2f} ms {calls:8d}  {name}", flush=True)
    llm.shutdown()
    return dict(walls=walls, own=own)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--torch-profile", action="store_true", help="torch.profiler's CPU view (CUDA runtime calls)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    first = one_engine("first engine", args.steps, args.torch_profile)
    gc.collect()
    torch.cuda.empty_cache()
    second = one_engine("second engine", args.steps, args.torch_profile)
    diff = sorted(((first["own"].get(k, (0, 0))[0] - second["own"].get(k, (0, 0))[0], k)
                   for k in set(first["own"]) | set(second["own"])), reverse=True)
    print("== own time, first engine minus second (ms, calls first / second)", flush=True)
    for d, k in diff[:25]:
        print(f"  {d:9.2f}  {first['own'].get(k, (0, 0))[1]:7d} / {second['own'].get(k, (0, 0))[1]:7d}  {k}", flush=True)
    with open(os.path.join(args.out, "first_engine_host.json"), "w") as f:
        json.dump(dict(first_walls=first["walls"], second_walls=second["walls"],
                       diff=[[round(d, 2), k] for d, k in diff[:60]]), f, indent=1)


if __name__ == "__main__":
    main()
