"""Where a step's time goes on the GPU machine.
Usage: python3 benchmarks/profile_step.py llama-1b|llama-8b [decode|b1host|thr|thrq|ttft ...] [lockstep] [key=value ...]
  decode: b1 decode wall, graph replay time, and the kernel table of one eager bs=1 step
  b1host: cProfile (host side) of the b1 decode (256 steps)
  thr:    cProfile (host side) of 512 requests of the peers workload (thr512)
  thrq:   thr512 timed only (for sweeps of engine arguments)
  ttft:   kernel table of one 1024-token prefill
  ttftrep: ttft1024 wall time of 8 fresh prompts (one figure is noisy: the step is host-bound)
  lockstep: async scheduling off (`thr lockstep` vs `thr` is the on/off A/B on one machine)
  key=value: extra LLM(...) arguments, e.g. max_num_seqs=512 (ints parsed)"""
import cProfile
import io
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".devcarry")
from peers import make_model_dir  # noqa: E402
from peers_thr import run_thr, thr_requests  # noqa: E402

from pagedserve import LLM, SamplingParams  # noqa: E402

name = sys.argv[1]
stages = [a for a in sys.argv[2:] if "=" not in a] or ["decode"]
extra = {k: int(v) if v.isdigit() else v for k, v in (a.split("=", 1) for a in sys.argv[2:] if "=" in a)}
t_start = time.time()
llm = LLM(model=make_model_dir(name), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
          max_model_len=2048, gpu_memory_utilization=0.85, seed=0,
          async_scheduling=False if "lockstep" in stages else None, **extra)
print(f"{name} {extra}: ready in {time.time() - t_start:.1f} s")


def kernel_table(fn, rows=20):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as pr:
        fn()
        torch.cuda.synchronize()
    print(pr.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


if "decode" in stages:
    prompt = {"prompt_token_ids": list(range(100, 228))}
    sp = SamplingParams(max_tokens=256, ignore_eos=True, temperature=0.0, detokenize=False)
    llm.generate([prompt], [sp], use_tqdm=False)
    t0 = time.time()
    llm.generate([prompt], [sp], use_tqdm=False)
    print(f"{name} b1 decode: {256 / (time.time() - t0):.1f} tok/s")
    g = llm.engine.core.executor.runner.graph_runner
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(50):
        g.graphs[1].replay()
    torch.cuda.synchronize()
    print(f"graph replay bs=1: {(time.time() - t0) * 20:.3f} ms")
    with torch.inference_mode():
        kernel_table(lambda: g._forward(1), 25)


def cprofile(fn, label, rows=22):
    prof = cProfile.Profile()
    t0 = time.time()
    prof.enable()
    result = fn()
    prof.disable()
    dt = time.time() - t0
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(rows)
    print(f"--- {label}: {dt:.2f} s under cProfile")
    print(s.getvalue()[:5000])
    return result, dt


if "b1host" in stages:
    prompt = {"prompt_token_ids": list(range(100, 228))}
    sp = SamplingParams(max_tokens=256, ignore_eos=True, temperature=0.0, detokenize=False)
    llm.generate([prompt], [sp], use_tqdm=False)
    cprofile(lambda: llm.generate([prompt], [sp], use_tqdm=False), "b1 decode, 256 steps")
if "thr" in stages or "thrq" in stages:
    outs, dt = run_thr(llm)
    print(f"{name} {extra} thr512: {sum(len(o.outputs[0].token_ids) for o in outs) / dt:.0f} out tok/s")
if "thr" in stages:
    prompts, sps = thr_requests(512)
    outs, dt = cprofile(lambda: llm.generate(prompts, sps, use_tqdm=False), "thr512", 30)
    print(f"thr512 under cProfile: {sum(len(o.outputs[0].token_ids) for o in outs) / dt:.0f} out tok/s")
if "ttftrep" in stages:
    one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0, detokenize=False)
    llm.generate([{"prompt_token_ids": [(i * 7) % 32000 + 3 for i in range(1024)]}], [one], use_tqdm=False)
    times = []
    for k in range(8):
        t0 = time.time()
        llm.generate([{"prompt_token_ids": [(i * (13 + 2 * k) + 5) % 32000 + 3 for i in range(1024)]}], [one],
                     use_tqdm=False)
        times.append(round((time.time() - t0) * 1e3, 1))
    print(f"{name} ttft1024 ms, 8 fresh prompts: {times}")
if "ttft" in stages:
    one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0, detokenize=False)
    seeds = iter(range(11, 100))

    def fresh_prefill():   # a prompt never seen before: no prefix-cache hit
        k = next(seeds)
        llm.generate([{"prompt_token_ids": [(i * k + 3) % 32000 + 3 for i in range(1024)]}], [one], use_tqdm=False)
    kernel_table(fresh_prefill, 15)
