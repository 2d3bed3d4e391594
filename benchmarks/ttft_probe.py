"""ttft1024 (../shared/bench/peers.py's workload) in stages, and where one such step's time goes.
peers.py's llama-8b engine (dummy weights, max_model_len 2048); fresh 1024-token prompts, 1 output
token, timed 3 times each: on the fresh engine, after peers.py's batch-1 decode, after its thr512
batch; then torch.profiler over one more: the top device kernels and device time against wall.
Usage (GPU machine, repo root): PYTHONPATH=$PWD python3 benchmarks/ttft_probe.py [llama-8b] [peers.py path]
Env: PROBE_SWAP_SPACE (GiB, 0: no host KV tier), PROBE_PROFILE_FIRST=1 (profile the first prompt after
thr512), PROBE_PEERS_ORDER=1 (after thr512, peers.py's batch-1 decode and warm prompt, then the profiled one).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

from pagedserve import LLM, SamplingParams

name = sys.argv[1] if len(sys.argv) > 1 else "llama-8b"
spec = importlib.util.spec_from_file_location("peers", sys.argv[2] if len(sys.argv) > 2 else ".devcarry/peers.py")
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)
llm = LLM(model=peers.make_model_dir(name), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
          max_model_len=2048, gpu_memory_utilization=0.85, seed=0,
          swap_space=float(os.environ.get("PROBE_SWAP_SPACE", "4")))   # 0: no host KV tier (its pinning)
one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0, detokenize=False)
seed = [0]


def fresh() -> dict:
    seed[0] += 1
    return {"prompt_token_ids": [(i * 11 + 5 * seed[0]) % 32000 + 3 for i in range(1024)]}


def ttft(stage: str) -> None:
    times = []
    for _ in range(3):
        p = fresh()
        t0 = time.perf_counter()
        llm.generate([p], [one], use_tqdm=False)
        times.append(round((time.perf_counter() - t0) * 1e3, 1))
    print("RESULT", json.dumps({"model": name, "stage": stage, "ttft1024_ms": times}), flush=True)


llm.generate([fresh()], [one], use_tqdm=False)   # peers.py's warm-up prompt
ttft("fresh engine")
b1 = SamplingParams(max_tokens=256, ignore_eos=True, temperature=0.0, detokenize=False)
for _ in range(2):
    llm.generate([{"prompt_token_ids": list(range(100, 228))}], [b1], use_tqdm=False)
ttft("after b1_decode")
reqs = peers.workload(512)
t0 = time.perf_counter()
llm.generate([{"prompt_token_ids": p} for p, _ in reqs],
             [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0, detokenize=False) for _, o in reqs],
             use_tqdm=False)
print(f"thr512 batch {time.perf_counter() - t0:.2f} s", flush=True)
if os.environ.get("PROBE_PEERS_ORDER"):   # peers.py's order after thr512: batch-1 decode, a warm prompt, then the timed one
    for what, prompt, sp in (("b1_decode", {"prompt_token_ids": list(range(100, 228))}, b1),
                             ("warm prompt", fresh(), one)):
        t0 = time.perf_counter()
        llm.generate([prompt], [sp], use_tqdm=False)
        print(f"{what} after thr512 {(time.perf_counter() - t0) * 1e3:.1f} ms", flush=True)
elif not os.environ.get("PROBE_PROFILE_FIRST"):   # else the profile below takes the first prompt after thr512
    ttft("after thr512")
from torch.profiler import ProfilerActivity, profile  # noqa: E402
p = fresh()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    t0 = time.perf_counter()
    llm.generate([p], [one], use_tqdm=False)
    wall = time.perf_counter() - t0
events = [e for e in prof.key_averages() if e.device_time_total > 0]
device = sum(e.self_device_time_total for e in events) / 1e3
print(f"profiled step: wall {wall * 1e3:.1f} ms (under the profiler), device kernels {device:.1f} ms")
if os.environ.get("PROBE_PROFILE_FIRST") or os.environ.get("PROBE_PEERS_ORDER"):
    ttft("after thr512 and the profiled one")
for e in sorted(events, key=lambda e: -e.self_device_time_total)[:15]:
    print(f"  {e.self_device_time_total / 1e3:8.2f} ms  x{e.count:<4d} {e.key[:110]}")
cpu = sorted(prof.key_averages(), key=lambda e: -e.cpu_time_total)[:12]
for e in cpu:
    print(f"  cpu {e.cpu_time_total / 1e3:8.2f} ms  x{e.count:<4d} {e.key[:110]}")
