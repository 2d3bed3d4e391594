"""peers_long.py's prefix256 at num_scheduler_steps 1 and K in one engine, the scheduler's knob flipped
between runs (as window_gpu.py does), in an order that puts each mode first and last; then one run of each
under torch.profiler: device busy time (the union of kernel intervals), the gaps between kernels, the
launches and the host's synchronising calls. Session 51 measured K=4 -0.4% on prefix256 (separate
processes, K=1 first); the CPU replay gave the same 129 steps and 32,768 rows, so this asks where a
window's steps lose time on the device or on the host.

Each run draws its own 2,048-token system prompt and suffixes (a fresh rng), so no run hits another's
cached prefix; every run has the same shape: 256 x (2,048 shared + 64) tokens, 128 out, greedy, ignore_eos.
Engine arguments are peers_long.py's (llama-8b, max_model_len 32768, gpu_memory_utilization 0.85).

Usage: PYTHONPATH=$PWD python3 benchmarks/prefix256_window.py [K] [ORDER] [--profile]
  K default 4; ORDER a string of 1 and K (default 1KK11K); OUT (env) names a folder for the profile summary.
  SMOKE=1 runs a tiny llama with 16 requests (a CPU check of the script, no figures)."""
import json
import os
import random
import sys
import tempfile
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", ".devcarry"), "/work/shared/bench"]

from pagedserve import LLM, SamplingParams  # noqa: E402

SMOKE = os.environ.get("SMOKE") == "1"


def make_engine(**kwargs) -> LLM:
    """The engine (kwargs: more engine arguments, e.g. max_num_seqs)."""
    if SMOKE:
        from transformers import LlamaConfig
        d = tempfile.mkdtemp()
        LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096).save_pretrained(d)
        return LLM(model=d, load_format="dummy", skip_tokenizer_init=True, dtype="float32", max_model_len=4096,
                   seed=0, **kwargs)
    from peers import make_model_dir
    d = make_model_dir("llama-8b")
    cfg = json.load(open(f"{d}/config.json"))
    cfg["max_position_embeddings"] = 32768
    d += "-32k"
    os.makedirs(d, exist_ok=True)
    json.dump(cfg, open(f"{d}/config.json", "w"))
    return LLM(model=d, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", max_model_len=32768,
               gpu_memory_utilization=0.85, seed=0, **kwargs)


def workload(seed: int):
    rng = random.Random(1000 + seed)
    n, prefix, suffix, out = (16, 256, 16, 16) if SMOKE else (256, 2048, 64, 128)
    sysp = [rng.randrange(3, 32000) for _ in range(prefix)]
    prompts = [{"prompt_token_ids": sysp + [rng.randrange(3, 32000) for _ in range(suffix)]} for _ in range(n)]
    sp = SamplingParams(max_tokens=out, ignore_eos=True, temperature=0.0, detokenize=False)
    return prompts, [sp] * n


def timed_run(llm: LLM, seed: int) -> tuple[float, int]:
    prompts, params = workload(seed)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)


def busy_and_gaps(trace_path: str) -> dict:
    """Union of the kernel / memcpy intervals in a chrome trace: device busy ms, and the gaps between them."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    host = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cuda_runtime":
            name = e.get("name", "")
            h = host.setdefault(name, [0, 0.0])
            h[0] += 1
            h[1] += e.get("dur", 0) / 1e3
    busy, gaps, end = 0.0, [], None
    for s, t in spans:
        if end is None or s > end:
            if end is not None:
                gaps.append(s - end)
            busy += t - s
            end = t
        elif t > end:
            busy += t - end
            end = t
    gaps.sort()
    big = [g for g in gaps if g >= 20]
    return dict(device_span_ms=round((spans[-1][1] - spans[0][0]) / 1e3, 1) if spans else 0,
                busy_ms=round(busy / 1e3, 1), kernels=len(spans), gaps_ms=round(sum(gaps) / 1e3, 1),
                gaps_over_20us=len(big), gaps_over_20us_ms=round(sum(big) / 1e3, 1),
                largest_gaps_us=[round(g) for g in gaps[-8:]],
                host_calls={k: (v[0], round(v[1], 1)) for k, v in sorted(host.items(), key=lambda kv: -kv[1][1])[:8]})


def profiled_run(llm: LLM, seed: int, out_dir: str, tag: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        dt, _ = timed_run(llm, seed)
    path = os.path.join(out_dir, f"prefix256_{tag}.json")
    prof.export_chrome_trace(path)
    summary = dict(wall_ms=round(dt * 1e3, 1), **busy_and_gaps(path))
    os.remove(path)  # tens of MB: only the summary comes back
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    with open(os.path.join(out_dir, f"prefix256_{tag}_top.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=30))
    return summary


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    k = int(args[0]) if args else 4
    order = [1 if c == "1" else k for c in (args[1] if len(args) > 1 else "1KK11K")]
    llm = make_engine()
    scheduler = llm.engine.core.scheduler
    timed_run(llm, 99)  # warm-up: every graph and kernel this workload meets
    walls = {}
    for i, steps in enumerate(order):
        scheduler.num_scheduler_steps = steps
        dt, gen = timed_run(llm, i)
        walls.setdefault(steps, []).append(dt)
        print(f"run {i} num_scheduler_steps {steps}: {gen} tokens in {dt:.3f} s ({gen / dt:,.0f} tok/s)", flush=True)
    mean = {s: sum(v) / len(v) for s, v in walls.items()}
    print("RESULT " + json.dumps(dict(workload="prefix256", order="".join(map(str, order)),
                                      wall_s={s: [round(x, 3) for x in v] for s, v in walls.items()},
                                      mean_s={s: round(m, 3) for s, m in mean.items()},
                                      window_vs_single=round(mean[1] / mean[k] - 1, 4) if k != 1 else 0)),
          flush=True)
    if "--profile" in sys.argv:
        out_dir = os.environ.get("OUT", tempfile.mkdtemp())
        os.makedirs(out_dir, exist_ok=True)
        for steps in (1, k):
            scheduler.num_scheduler_steps = steps
            print("RESULT " + json.dumps(dict(workload="prefix256 profiled", num_scheduler_steps=steps,
                                              **profiled_run(llm, 50 + steps, out_dir, f"k{steps}"))), flush=True)


if __name__ == "__main__":
    main()
