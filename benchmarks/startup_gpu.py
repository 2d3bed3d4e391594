"""Issue 22, start-up: `LLM(llama-8b dummy)` to ready, cold and warm Triton cache, with and
without compile-ahead (worker/compile_ahead.py) and with the Llama-3 tokenizer loaded either
way (AutoTokenizer, or load_tokenizer's short way). Each variant is a fresh process running
benchmarks/serve_gpu.py's startup probe (in serve_startup.py; phases: import, config, tokenizer,
weights, KV profile, graph capture, first request); a cold variant gets an empty TRITON_CACHE_DIR.

    python3 benchmarks/startup_gpu.py [--cpu-smoke] [--budget-s 140] [--ab DIR]

--ab DIR: cold / warm pairs of the working tree against the pagedserve package under DIR
(`git archive COMMIT pagedserve | tar -x -C DIR`), interleaved. Each probe also reports each
compile-ahead round (dry run, the wait after it, each kernel's compile, the longest launcher
build) and the graphs' warm-ups and captures.

Checks: every variant generates the same 16 greedy ids (dummy weights, seed 0) and, with
compile-ahead on, no Triton kernel compiles after it (`late_compiles` 0 up to ready).
Prints one `RESULT {json}` per variant and a table; writes startup_gpu.{json,md} and the
probes' logs under $OUT. Needs .devcarry/serve/ (the Llama-3 tokenizer, as serve_gpu.py).
About 110 s on an H200. --cpu-smoke: a 2-layer hidden-64 llama on CPU (compile-ahead is
CUDA-only there: this proves the plumbing only).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_startup  # noqa: E402
os.environ.setdefault("PAGEDSERVE_COMPILE_AHEAD_STRICT", "1")   # a failed compile-ahead fails the run

ROOT = serve_startup.ROOT
OUT = serve_startup.OUT
# (label, Triton cache, compile-ahead threads, tokenizer: None | "auto" | "short"); in order
# of importance: later ones are skipped when the budget runs out
VARIANTS = [
    ("cold, ahead 16", "cold", 16, None),
    ("cold, off (before)", "cold", 0, None),
    ("warm, ahead 16", "warm", 16, None),
    ("warm, off", "warm", 0, None),
    ("warm+tok short, ahead 16", "warm", 16, "short"),
    ("warm+tok auto, ahead 16", "warm", 16, "auto"),
    ("cold+tok short, ahead 16", "cold", 16, "short"),
    ("cold, ahead 1 (serial)", "cold", 1, None),
    ("cold, ahead 4", "cold", 4, None),
]
# --ab DIR: the working tree against the pagedserve package under DIR (e.g. `git archive` of the
# commit before a change), interleaved, one fresh process each
AB_VARIANTS = [
    ("cold, before", "cold", 16, None, "before"),
    ("cold, now", "cold", 16, None, None),
    ("cold, now (2)", "cold", 16, None, None),
    ("cold, before (2)", "cold", 16, None, "before"),
    ("cold, before (3)", "cold", 16, None, "before"),
    ("cold, now (3)", "cold", 16, None, None),
    ("warm, before", "warm", 16, None, "before"),
    ("warm, now", "warm", 16, None, None),
]
KEYS = ("import", "config", "tokenizer", "weights", "kv_profile", "graph_capture", "capture_fwd_decode",
        "capture_fwd_prefill", "ahead_dry_run", "ahead_compile", "compiled_ahead", "late_compiles",
        "mixed_warmup", "mixed_capture", "capture_one", "gc", "llm_total", "ready", "first_request", "process_s")


def probe_setup(workers: int, tokenizer_way: str | None):
    """Runs in the probe process after `import pagedserve`: sets the variant, counts Triton
    compiles (ahead, late) and times compile-ahead's two halves."""
    from triton import knobs
    from pagedserve.models import loader
    from pagedserve.worker import compile_ahead
    compile_ahead.WORKERS = workers
    if tokenizer_way == "auto":
        loader.plain_tokenizer = lambda directory: False
    figures = {"ahead_dry_run": 0.0, "ahead_compile": 0.0, "compiled_ahead": 0, "late_compiles": 0}
    inside = [False]

    def on_compile(**kwargs) -> None:   # one line per specialisation in the log: which kernels, how many
        figures["compiled_ahead" if inside[0] else "late_compiles"] += 1
        print(f"TRITON_COMPILE {'ahead' if inside[0] else 'late'} {kwargs.get('repr', '?')[:300]}", flush=True)
    knobs.runtime.jit_post_compile_hook = on_compile

    # per compile-ahead round: its dry run, the rest (the compiles it waits for), each kernel's
    # own compile time (its thread's wall time) and the longest launcher build; works for the
    # compile_ahead of any commit (--ab's "before" tree) that has recording() and _build_launcher
    rounds: list[dict] = []
    kernel_s: dict[str, float] = {}

    def time_compiles(fn) -> None:
        original = getattr(fn, "compile", None)
        if original is None or getattr(original, "_timed", False):
            return

        def timed(*a, **k):
            c0 = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                name = getattr(fn, "__name__", str(fn))
                kernel_s[name] = max(kernel_s.get(name, 0.0), time.perf_counter() - c0)
        timed._timed = True
        fn.compile = timed
    from triton.runtime.jit import JITFunction   # Triton sets fn.compile in create_binder (lazily)
    create_binder = JITFunction.create_binder

    def timed_create_binder(self, *args, **kwargs):
        out = create_binder(self, *args, **kwargs)
        time_compiles(self)
        return out
    JITFunction.create_binder = timed_create_binder

    ahead, recording, build_launcher = compile_ahead.compile_ahead, compile_ahead.recording, \
        compile_ahead._build_launcher

    def timed_ahead(*args, **kwargs):
        t0, inside[0] = time.perf_counter(), True
        rounds.append({})
        kernel_s.clear()
        try:
            return ahead(*args, **kwargs)
        finally:
            inside[0] = False
            r = rounds[-1]
            total = time.perf_counter() - t0
            r["compile_s"] = round(total - r.get("dry_run_s", 0.0), 3)   # after the dry run
            figures["ahead_compile"] += r["compile_s"]
            slowest = max(kernel_s.items(), key=lambda kv: kv[1], default=("-", 0.0))
            r.update(slowest=slowest[0], slowest_s=round(slowest[1], 3),
                     kernels={k: round(v, 3) for k, v in sorted(kernel_s.items(), key=lambda kv: -kv[1])})

    def timed_build_launcher(kernel):
        t0 = time.perf_counter()
        try:
            return build_launcher(kernel)
        finally:
            if rounds:
                rounds[-1]["launcher_max_s"] = round(max(rounds[-1].get("launcher_max_s", 0.0),
                                                         time.perf_counter() - t0), 3)

    class TimedRecording:
        def __init__(self, *args):
            self.args = args

        def __enter__(self):
            self.t0, self.inner = time.perf_counter(), recording(*self.args)
            return self.inner.__enter__()

        def __exit__(self, *exc):
            dry = time.perf_counter() - self.t0
            figures["ahead_dry_run"] += dry
            if rounds:
                rounds[-1]["dry_run_s"] = round(dry, 3)
            return self.inner.__exit__(*exc)
    figures["rounds"] = rounds
    compile_ahead.compile_ahead, compile_ahead.recording = timed_ahead, TimedRecording
    compile_ahead._build_launcher = timed_build_launcher
    for module in ("pagedserve.worker.model_runner", "pagedserve.worker.cuda_graph"):   # imported by name there
        mod = __import__(module, fromlist=["compile_ahead"])
        if getattr(mod, "compile_ahead", None) is ahead:
            mod.compile_ahead = timed_ahead
    # the graphs' phases: the mixed pieces' eager warm-ups and captures, the decode / prefill graphs
    from pagedserve.worker.cuda_graph import CudaGraphRunner
    from pagedserve.worker.mixed_graphs import MixedGraphs
    mixed_forward, capture_one = MixedGraphs.forward, CudaGraphRunner._capture_one
    for key in ("mixed_warmup", "mixed_capture", "capture_one"):
        figures[key] = 0.0

    def timed_mixed_forward(self, size, stream, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return mixed_forward(self, size, stream, *args, **kwargs)
        finally:
            if stream is not None:
                figures["mixed_capture"] += time.perf_counter() - t0
            elif self.runner.pool is not None:   # set just before the capture loop: a warm-up, not the dry run
                figures["mixed_warmup"] += time.perf_counter() - t0

    def timed_capture_one(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return capture_one(self, *args, **kwargs)
        finally:
            figures["capture_one"] += time.perf_counter() - t0
    MixedGraphs.forward, CudaGraphRunner._capture_one = timed_mixed_forward, timed_capture_one
    return figures


def run_variants(model_dir: Path, cpu: bool, budget_s: float, log, before: Path | None = None) -> list[dict]:
    start = time.perf_counter()
    cache = Path("/tmp/triton_startup_gpu")
    runs = []
    variants = AB_VARIANTS if before is not None else [(*v, None) for v in VARIANTS]
    for label, triton_cache, workers, tokenizer_way, tree in variants:
        left = budget_s - (time.perf_counter() - start)
        if left < (35 if triton_cache == "cold" else 20):
            print(f"{label}: skipped, {left:.0f} s left", flush=True)
            continue
        if triton_cache == "cold":
            shutil.rmtree(cache, ignore_errors=True)
        env = {**os.environ, "TRITON_CACHE_DIR": str(cache)}
        if tree == "before":
            env["PYTHONPATH"] = os.pathsep.join([str(before), env.get("PYTHONPATH", "")])
        flags = (["--cpu-smoke"] if cpu else []) + (["--tokenizer", tokenizer_way] if tokenizer_way else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "probe", str(model_dir), "--workers", str(workers), *flags],
                                  env=env, cwd=ROOT, capture_output=True, text=True, timeout=min(120, left))
        except subprocess.TimeoutExpired as exc:
            log.write(f"==== {label} timed out\n{exc.stdout}\n{exc.stderr}\n")
            print(f"{label}: timed out", flush=True)
            continue
        phases = serve_startup.probe_result(proc, label, log, t0, variant=label)
        if phases is not None:
            runs.append(phases)
    return runs


def checks(runs: list[dict]) -> list[str]:
    problems = []
    ids = {json.dumps(r["token_ids"]) for r in runs}
    if len(ids) > 1:
        problems.append(f"greedy ids differ between variants: {sorted(ids)}")
    for r in runs:
        if r.get("compiled_ahead") and r.get("late_compiles"):
            problems.append(f"{r['variant']}: {r['late_compiles']} Triton compiles after compile-ahead")
    return problems


def markdown(runs: list[dict]) -> str:
    lines = ["| start-up s, llama-8b dummy | " + " | ".join(r["variant"] for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for key in KEYS:
        lines.append(f"| {key} | " + " | ".join(str(r.get(key, "-")) for r in runs) + " |")
    lines.append("| compile rounds: dry run / compile (slowest kernel) s | " + " | ".join(
        "; ".join(f"{x.get('dry_run_s', '-')} / {x.get('compile_s', '-')} ({x.get('slowest', '-')} {x.get('slowest_s', '-')})"
                  for x in r.get("rounds", [])) or "-" for r in runs) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        parser = argparse.ArgumentParser()
        parser.add_argument("probe")
        parser.add_argument("model_dir")
        parser.add_argument("--workers", type=int, required=True)
        parser.add_argument("--tokenizer", choices=["auto", "short"])
        parser.add_argument("--cpu-smoke", action="store_true")
        args = parser.parse_args()
        serve_startup.startup_probe(args.model_dir, args.cpu_smoke, args.tokenizer is not None,
                                lambda: probe_setup(args.workers, args.tokenizer))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--budget-s", type=float, default=140.0)
    parser.add_argument("--ab", type=Path, metavar="DIR",
                        help="A/B: the working tree against the pagedserve package under DIR")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    model_dir = serve_startup.make_model_dir(Path("/tmp/models/tiny-llama3tok" if args.cpu_smoke
                                                  else "/tmp/models/llama-8b-llama3tok"),
                                             serve_startup.TINY if args.cpu_smoke else serve_startup.LLAMA_8B)
    with open(OUT / "startup_probes.log", "w") as log:
        runs = run_variants(model_dir, args.cpu_smoke, args.budget_s, log, args.ab)
    problems = checks(runs)
    table = markdown(runs)
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs, "problems": problems}
    (OUT / "startup_gpu.json").write_text(json.dumps(result, indent=1))
    (OUT / "startup_gpu.md").write_text(table)
    print(table, flush=True)
    print("CHECKS " + ("ok: same greedy ids in every variant, no compile after compile-ahead" if not problems
                       else "FAILED: " + "; ".join(problems)), flush=True)


if __name__ == "__main__":
    main()
