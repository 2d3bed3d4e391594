"""Issue 19: where a batch-1 decode step of the default model goes on the CPU, over the decode
steps of one 128-token prompt. Default: wall-clock ms per step, split by timing wrappers into
the C++ decoder stack (gguf.cpu_decode_stack: every layer and the final norm in one call), the
LM head (compute_logits), the rest of the model's forward (the embedding), the rest of the
runner (inputs, sampling) and the engine outside the runner (scheduler, outputs).
--profile: torch.profiler instead (aten calls per step, the ops by self CPU time, the share
of the step outside aten ops; it sees nothing inside the C++ call and inflates the step).
--phases: inside the C++ stack (DecodeStack.set_profile / timings), per thread and kind of
phase, us per step working (claiming and running chunks) and waiting for the other threads'
chunks, and chunks per step; "entry" is the time from the call to a thread's first phase.

Usage: PYTHONPATH=. python benchmarks/cpu_profile_decode.py [--dtype auto|float32] [--threads N]
       [--steps N] [--profile | --phases] [--out FILE.json]"""
import argparse
import collections
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
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--phases", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spent = collections.defaultdict(float)
    if not args.profile:
        time_calls(spent)   # --phases too: it finds the stack through the timed call
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
    if args.phases:
        return phases(args, gen, prefill)
    if not args.profile:
        report(args, gen, spent, prefill)
        return
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


STACK_LAYERS: list = []   # the layers of the last cpu_decode_stack call
PHASE_NAMES = ("qkv", "attention", "attn_q8", "o", "gate_up_silu", "down", "final_norm", "entry")


def phases(args, gen, prefill: float) -> None:
    """us per decode step in each kind of phase of the C++ stack, per thread."""
    stack = STACK_LAYERS[0].__dict__["_gguf_decode_stack"][1]
    stack.set_profile(True)
    t0 = time.perf_counter()
    gen(args.steps + 1)
    wall = time.perf_counter() - t0 - prefill
    times, runs, stack_us = stack.timings()
    stack.set_profile(False)
    per = times / runs
    rows = {name: dict(work_us=[round(float(x), 1) for x in per[:, k, 0]],
                       wait_us=[round(float(x), 1) for x in per[:, k, 1]],
                       chunks=[round(float(x), 1) for x in per[:, k, 2]]) for k, name in enumerate(PHASE_NAMES)}
    result = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), dtype=args.dtype, threads=args.threads,
                  load_average_1m=round(os.getloadavg()[0], 2), steps=runs, step_ms=round(wall / args.steps * 1e3, 2),
                  stack_ms=round(stack_us / runs / 1e3, 3),
                  work_ms=[round(float(x), 3) for x in per[:, :-1, 0].sum(1) / 1e3],
                  wait_ms=[round(float(x), 3) for x in per[:, :-1, 1].sum(1) / 1e3], phases=rows)
    print(f"{'phase':14s}" + "".join(f"  t{t} work / wait us (chunks)" for t in range(per.shape[0])))
    for name, r in rows.items():
        print(f"{name:14s}" + "".join(f"  {w:8.1f} / {x:7.1f} ({c:5.1f})      "
                                      for w, x, c in zip(r["work_us"], r["wait_us"], r["chunks"])))
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def time_calls(spent: dict) -> None:
    """Wraps the step's parts so that each call adds its wall time to spent[part]."""
    import pagedserve.models.llama as llama
    from pagedserve.core.engine_core import EngineCore
    from pagedserve.worker.model_runner import ModelRunner

    def timed(fn, part):
        def call(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[part] += time.perf_counter() - t
        return call
    fused = llama.cpu_decode_stack

    def stack_call(layers, *a):
        STACK_LAYERS[:] = layers
        return fused(layers, *a)
    llama.cpu_decode_stack = timed(stack_call, "decoder_stack")
    llama.LlamaModel.forward = timed(llama.LlamaModel.forward, "model_forward")
    llama.LlamaForCausalLM.compute_logits = timed(llama.LlamaForCausalLM.compute_logits, "lm_head")
    ModelRunner.execute_model = timed(ModelRunner.execute_model, "runner")
    EngineCore.step = timed(EngineCore.step, "engine_step")


def report(args, gen, spent: dict, prefill: float) -> None:
    """ms per decode step of each part (the prefill's share, timed alone, taken out)."""
    spent.clear()
    gen(1)
    first = dict(spent)
    spent.clear()
    t0 = time.perf_counter()
    gen(args.steps + 1)
    wall = time.perf_counter() - t0 - prefill
    ms = {k: (v - first.get(k, 0.0)) / args.steps * 1e3 for k, v in spent.items()}
    parts = dict(decoder_stack=ms.get("decoder_stack", 0.0), lm_head=ms.get("lm_head", 0.0),
                 model_rest=ms.get("model_forward", 0.0) - ms.get("decoder_stack", 0.0),
                 runner_rest=ms.get("runner", 0.0) - ms.get("model_forward", 0.0) - ms.get("lm_head", 0.0),
                 engine_rest=ms.get("engine_step", 0.0) - ms.get("runner", 0.0))
    step_ms = wall / args.steps * 1e3
    parts["outside_engine_step"] = step_ms - ms.get("engine_step", 0.0)
    result = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), dtype=args.dtype, threads=args.threads,
                  load_average_1m=round(os.getloadavg()[0], 2), steps=args.steps, step_ms=round(step_ms, 2),
                  tok_s=round(1e3 / step_ms, 1), ms_per_step={k: round(v, 3) for k, v in parts.items()})
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
