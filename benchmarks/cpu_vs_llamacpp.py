"""Issue 19: the embedded default model on the CPU, pagedserve against llama.cpp
(llama-cpp-python, the same GGUF file), same machine, same run, one engine at a time (each
in its own subprocess, all cores: torch threads / n_threads = physical cores).

Workloads (token-id prompts, identical for both engines; greedy, forced output lengths):
  b1_decode   one 128-token prompt, 128 new tokens: decode tok/s (after the first token)
  ttft256     a fresh 256-token prompt, time to the first token (ms; median of 5 prompts)
  batch       64 prompts (--batch N: the first N), input U[32,256], output U[16,128]: output
              tok/s; pagedserve runs them as one generate() call (continuous batching),
              llama.cpp one at a time, transformers (engine "transformers": only this
              workload) as one batched generate() (left padding, the batch's longest output
              forced; only requested tokens count), fp32 weights dequantized from the GGUF

llama-cpp-python is not a dependency: install it into any interpreter
(`pip install llama-cpp-python==0.3.36`, it builds llama.cpp) and pass that interpreter
with --llama-python (the default is this one), or put its package on PYTHONPATH (and its
libraries in LLAMA_CPP_LIB_PATH). llama.cpp runs without extra buffer types (its AMX path
raises SIGILL in the VM this was measured on; LLAMA_NO_EXTRA_BUFTS=0 keeps them).
pagedserve runs from the current directory (PYTHONPATH=. first): run this from another
checkout to measure that one. Engine "pagedserve_int4" is pagedserve with PAGEDSERVE_GGUF_CPP=0
(torch's int4 kernel instead of the C++ GEMV on the GGUF blocks: main's path before it), so
`--engines pagedserve,pagedserve_int4,llamacpp --repeat 3` interleaves the A/B; engine
"pagedserve_fp32act" is pagedserve with PAGEDSERVE_GGUF_Q8_ACT=0 (the C++ GEMV with fp32
activations instead of Q8 ones).
The machine's 1-minute load average at the start and end of each engine's run is recorded
(a shared machine makes absolute figures noisy: compare engines of the same repeat), and the
batch's process CPU seconds (batch_cpu_s: at one thread, what the engine itself spent, less
moved by other processes than the wall time; at more threads it includes spin-waits).
Usage: python benchmarks/cpu_vs_llamacpp.py [--engines pagedserve,pagedserve_int4,pagedserve_fp32act,llamacpp,transformers] [--llama-python PY]
       [--dtype auto|float32] [--threads N] [--batch N] [--b1-only] [--out FILE.json] [--repeat N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

B1_PROMPT, B1_NEW = 128, 128
TTFT_LEN, TTFT_REPS = 256, 5
BATCH, IN_RANGE, OUT_RANGE = 64, (32, 256), (16, 128)


def prompts(batch_size: int = BATCH) -> dict:
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(100, 40000) for _ in range(n)]  # noqa: E731
    batch = [(ids(rng.randint(*IN_RANGE)), rng.randint(*OUT_RANGE)) for _ in range(BATCH)][:batch_size]
    return dict(b1=ids(B1_PROMPT), ttft=[ids(TTFT_LEN) for _ in range(TTFT_REPS + 1)], batch=batch)


def physical_cores() -> int:
    try:
        out = subprocess.run(["lscpu", "-p=Core,Socket"], capture_output=True, text=True, check=True).stdout
        return len({line for line in out.splitlines() if not line.startswith("#")}) or os.cpu_count()
    except (OSError, subprocess.CalledProcessError):
        return os.cpu_count() or 1


def run_pagedserve(p: dict, dtype: str, threads: int, engine: str = "pagedserve") -> dict:
    import torch
    torch.set_num_threads(threads)

    from pagedserve import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(max_model_len=1024, seed=0, dtype=dtype)
    startup = time.perf_counter() - t0

    def gen(items):
        return llm.generate([{"prompt_token_ids": ids} for ids, _ in items],
                            [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)
                             for _, n in items], use_tqdm=False)
    gen([(p["b1"], 8)])   # warm-up
    t0 = time.perf_counter()
    ttfts = []
    for ids in p["ttft"][:1]:
        gen([(ids, 1)])
    for ids in p["ttft"][1:]:
        t0 = time.perf_counter()
        gen([(ids, 1)])
        ttfts.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    gen([(p["b1"], 1)])
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = gen([(p["b1"], B1_NEW)])
    t_all = time.perf_counter() - t0
    assert len(out[0].outputs[0].token_ids) == B1_NEW
    b1 = (B1_NEW - 1) / (t_all - t_first)
    t0, c0 = time.perf_counter(), time.process_time()
    outs = gen(p["batch"]) if p["batch"] else []
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    import resource
    return dict(engine=engine, dtype=dtype, torch_threads=torch.get_num_threads(), startup_s=round(startup, 1),
                b1_decode_tok_s=round(b1, 1), ttft256_ms=_median(ttfts),
                ttft256_all_ms=[round(t, 1) for t in ttfts], batch_prompts=len(p["batch"]),
                batch_out_tok_s=round(n_out / wall, 1) if n_out else None, batch_wall_s=round(wall, 2),
                batch_cpu_s=round(cpu, 2), max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def run_llamacpp(p: dict, threads: int) -> dict:
    import llama_cpp

    if os.environ.get("LLAMA_NO_EXTRA_BUFTS", "1") == "1":
        # llama.cpp's AMX buffer type dies with SIGILL in this VM (AMX tiles not granted to the
        # guest); without extra buffer types Q4_1 runs on its AVX512 vec_dot path
        default_params = llama_cpp.llama_model_default_params

        def params():
            p = default_params()
            p.use_extra_bufts = False
            return p
        llama_cpp.llama_model_default_params = params
        llama_cpp.llama.llama_cpp.llama_model_default_params = params
    t0 = time.perf_counter()
    # the path from the parent: the --llama-python interpreter need not import pagedserve
    llm = llama_cpp.Llama(os.environ["CPU_VS_LLAMACPP_GGUF"], n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    startup = time.perf_counter() - t0

    def gen(ids, n):   # greedy; generate() does not stop at EOS, so lengths are forced
        llm.reset()
        start = time.perf_counter()
        first, toks = None, 0
        for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            toks += 1
            if first is None:
                first = time.perf_counter() - start
            if toks == n:
                break
        return first, time.perf_counter() - start
    gen(p["b1"], 8)
    ttfts = [gen(ids, 1)[0] * 1e3 for ids in p["ttft"][1:]]
    first, total = gen(p["b1"], B1_NEW)
    b1 = (B1_NEW - 1) / (total - first)
    t0, c0 = time.perf_counter(), time.process_time()
    for ids, n in p["batch"]:
        gen(ids, n)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    import resource
    return dict(engine="llama.cpp", version=llama_cpp.__version__, n_threads=threads, startup_s=round(startup, 1),
                b1_decode_tok_s=round(b1, 1), ttft256_ms=_median(ttfts),
                ttft256_all_ms=[round(t, 1) for t in ttfts],
                batch_prompts=len(p["batch"]),
                batch_out_tok_s=round(sum(n for _, n in p["batch"]) / wall, 1) if p["batch"] else None,
                batch_wall_s=round(wall, 2), batch_cpu_s=round(cpu, 2),
                max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def run_transformers(p: dict, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    from pagedserve.models.default_model import default_model_path
    path = default_model_path()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    startup = time.perf_counter() - t0
    batch = p["batch"]
    width = max(len(ids) for ids, _ in batch)
    pad = 0
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in batch])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in batch])
    longest = max(n for _, n in batch)
    with torch.inference_mode():
        model.generate(input_ids[:2, -16:], attention_mask=mask[:2, -16:], max_new_tokens=4, do_sample=False)
        t0, c0 = time.perf_counter(), time.process_time()
        model.generate(input_ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                       do_sample=False, pad_token_id=pad)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    import resource
    return dict(engine="transformers", torch_threads=torch.get_num_threads(), startup_s=round(startup, 1),
                batch_prompts=len(batch), batch_out_tok_s=round(sum(n for _, n in batch) / wall, 1),
                batch_wall_s=round(wall, 2), batch_cpu_s=round(cpu, 2),
                max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def _median(values: list) -> float | None:
    return round(statistics.median(values), 1) if values else None


def child(engine: str, dtype: str, threads: int, batch_size: int, b1_only: bool = False) -> None:
    p = prompts(batch_size)
    if b1_only:
        p.update(ttft=[], batch=[])
    load = os.getloadavg()[0]
    runners = {"pagedserve": lambda: run_pagedserve(p, dtype, threads),
               "pagedserve_int4": lambda: run_pagedserve(p, dtype, threads, "pagedserve_int4"),
               "pagedserve_fp32act": lambda: run_pagedserve(p, dtype, threads, "pagedserve_fp32act"),
               "llamacpp": lambda: run_llamacpp(p, threads),
               "transformers": lambda: run_transformers(p, threads)}
    result = runners[engine]()
    result["load_average_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]   # at start, at end
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="pagedserve,llamacpp")
    ap.add_argument("--llama-python", default=sys.executable)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, help="torch threads / n_threads (default: physical cores)")
    ap.add_argument("--batch", type=int, default=BATCH, help="prompts of the batch workload (the first N of 64)")
    ap.add_argument("--b1-only", action="store_true", help="only the b1 decode workload (quick interleaved A/B: --repeat)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    threads = args.threads or physical_cores()
    if args.child:
        child(args.child, args.dtype, threads, args.batch, args.b1_only)
        return
    results = []
    for rep in range(args.repeat):
        for engine in args.engines.split(","):
            if args.b1_only and engine == "transformers":   # it runs the batch workload only
                continue
            python = args.llama_python if engine == "llamacpp" else sys.executable
            cmd = [python, os.path.abspath(__file__), "--child", engine, "--dtype", args.dtype,
                   "--threads", str(threads), "--batch", str(args.batch)] + (["--b1-only"] if args.b1_only else [])
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
            if engine == "llamacpp":
                from pagedserve.models.default_model import default_model_path
                env["CPU_VS_LLAMACPP_GGUF"] = default_model_path()
            if engine == "pagedserve_int4":
                env["PAGEDSERVE_GGUF_CPP"] = "0"
            if engine == "pagedserve_fp32act":
                env["PAGEDSERVE_GGUF_Q8_ACT"] = "0"
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{engine} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(line[7:])
            result["repeat"] = rep
            print(json.dumps(result), flush=True)
            results.append(result)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    doc = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=dict(
        cpu=model, nproc=os.cpu_count(), physical_cores=physical_cores(), threads=threads, platform=platform.platform(),
        load_average_at_end=os.getloadavg()), command="python " + " ".join(sys.argv), results=results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
