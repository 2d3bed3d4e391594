"""Why thr512 moves ~7% between runs of the same engine (issue 22): llama-1b (dummy weights,
peers.py's set-up and workload) run `--runs` times in one process, each on a fresh engine; per
run the out tok/s, each core step's wall time (EngineCore.step wrapped: median / p90 / max, the
time in steps over 20 ms), the engine thread's CPU time over the wall time (near 1: the host is
the bound), and the GPU's SM clock and power while it ran (nvidia-smi every 100 ms).

Usage: python3 benchmarks/thr_spread.py OUT [--runs 4] [--model llama-1b]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

sys.path[:0] = [".", ".devcarry", os.path.join(os.path.dirname(os.path.abspath(".")), "shared", "bench")]

import torch  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def clocks(path: str, began: float, ended: float) -> dict:
    """Median SM clock (MHz) and power (W) of the nvidia-smi samples between two wall times."""
    rows = []
    for line in open(path):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0].replace(".", "").isdigit():
            continue
        t, mhz, watts = float(parts[0]), float(parts[1]), float(parts[2])
        if began <= t <= ended:
            rows.append((mhz, watts))
    if not rows:
        return {}
    return dict(samples=len(rows), sm_mhz_median=statistics.median(r[0] for r in rows),
                sm_mhz_min=min(r[0] for r in rows), power_w_median=statistics.median(r[1] for r in rows))


def one_run(model: str, smi_path: str) -> dict:
    from peers import make_model_dir, workload
    from pagedserve import LLM, SamplingParams
    llm = LLM(model=make_model_dir(model), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=2048, gpu_memory_utilization=0.85, seed=0)
    reqs = workload(512)
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    sps = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0, detokenize=False) for _, o in reqs]
    llm.generate(prompts[:8], sps[:8], use_tqdm=False)
    core = llm.engine.core
    steps: list[float] = []
    step = core.step

    def timed_step(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            steps.append(time.perf_counter() - t0)

    core.step = timed_step
    cpu0, t0, wall0 = time.thread_time(), time.perf_counter(), time.time()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    dt = time.perf_counter() - t0
    cpu = time.thread_time() - cpu0
    wall1 = time.time()
    core.step = step
    ms = sorted(s * 1e3 for s in steps)
    res = dict(out_tok_s=round(sum(len(o.outputs[0].token_ids) for o in outs) / dt, 1), wall_s=round(dt, 3),
               steps=len(ms), step_ms_median=round(statistics.median(ms), 3), step_ms_p90=round(ms[int(0.9 * len(ms))], 3),
               step_ms_max=round(ms[-1], 1), in_steps_s=round(sum(ms) / 1e3, 3),
               over_20ms_s=round(sum(m for m in ms if m > 20) / 1e3, 3),
               engine_thread_cpu_over_wall=round(cpu / dt, 3), **clocks(smi_path, wall0, wall1))
    llm.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--model", default="llama-1b")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    smi_path = os.path.join(args.out, "smi.csv")
    smi = subprocess.Popen(["bash", "-c", "while true; do echo \"$(date +%s.%N), $(nvidia-smi --query-gpu=clocks.sm,"
                            "power.draw --format=csv,noheader,nounits)\"; sleep 0.1; done"],
                           stdout=open(smi_path, "w"), stderr=subprocess.DEVNULL)
    results = dict(date=time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), machine=torch.cuda.get_device_name(0),
                   model=args.model, load_avg_start=os.getloadavg(), runs=[])
    try:
        for i in range(args.runs):
            res = one_run(args.model, smi_path)
            res["load_avg"] = os.getloadavg()
            log(f"run {i + 1}: {json.dumps(res)}")
            results["runs"].append(res)
            gc.collect()
            torch.cuda.empty_cache()
            with open(os.path.join(args.out, "thr_spread.json"), "w") as f:
                json.dump(results, f, indent=1)
    finally:
        smi.kill()


if __name__ == "__main__":
    main()
