"""Why thr512 moves between runs of the same engine (issue 22): llama-1b (dummy weights,
peers.py's set-up and workload) run `--runs` times in one process, each on a fresh engine; per
run the out tok/s, each core step's wall time (EngineCore.step wrapped: median / p90 / max, the
time in steps over 20 ms), the Triton compiles inside the timed run (late_compiles: each stalls its
step), the engine thread's CPU time over the wall time (1.0 whatever the
bound: CUDA's synchronisation spins), the GPU's side (CUDA events around each step's launch:
the time the GPU spent in steps, and idle between them waiting for the host; per step
[tokens, span ms, gap after ms] in the json), the garbage collector's pauses by generation
(count, total ms, longest ms), the start-up time, and with nvidia-smi polling (off with
--no-smi: session 18 found its queries themselves cost thr512 ~15%) the SM clock and power.
--ab: odd runs without LLM()'s start-up collection and freeze (pagedserve.llm, session 18);
--no-lmhead-pad: the LM head outside the graphs at its own row count (before a12b9ed).
--fused-max N: rotary + KV store inside the decode launch up to N rows (TritonBackend.fused_decode_max_seqs).
--no-heads-first: decode attention launches on the old grid (sequences fastest; before session 31's e864e59).
--mbt N: max_num_batched_tokens N (the library's default when not given).
--kv-cache-dtype D: the engine's kv_cache_dtype.
--steps K: num_scheduler_steps K (decode windows: a "step" of the per-step figures is then a schedule).

Usage: python3 benchmarks/thr_spread.py OUT [--runs 4] [--model llama-1b] [--no-smi] [--ab] [--no-lmhead-pad] [--fused-max N]
       [--no-heads-first] [--mbt N] [--kv-cache-dtype D] [--steps K]
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

from pin_gpu import GcPauses  # noqa: E402  (beside this file: the script's directory is on sys.path)


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


def _lmhead_pad() -> bool:
    from pagedserve.worker.cuda_graph import CudaGraphRunner
    return CudaGraphRunner.logits_rows.__name__ == "logits_rows"


def _total(n) -> int:
    return sum(n.values()) if isinstance(n, dict) else int(n or 0)


class _NoFreeze:
    """Stands in for the gc module in pagedserve.llm: LLM() as before session 18 (no collection,
    no freeze at start-up) for the A/B's "nofreeze" runs."""
    collect = staticmethod(lambda *a: 0)
    freeze = unfreeze = staticmethod(lambda: None)
    get_freeze_count = staticmethod(lambda: 0)


def _late_compiles() -> list:
    """compile_ahead.LATE_COMPILES (empty for a tree from before session 29, which has none)."""
    from pagedserve.worker import compile_ahead
    return getattr(compile_ahead, "LATE_COMPILES", [])


def one_run(model: str, smi_path: str, freeze: bool = True, mbt: int | None = None, kv_cache_dtype: str = "auto",
            steps: int | None = None) -> dict:
    from peers import make_model_dir, workload
    from pagedserve import LLM, SamplingParams
    import pagedserve.llm as llm_module
    llm_module.gc = gc if freeze else _NoFreeze
    t_ready = time.perf_counter()
    llm = LLM(model=make_model_dir(model), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=2048, gpu_memory_utilization=0.85, seed=0, max_num_batched_tokens=mbt,
              kv_cache_dtype=kv_cache_dtype, num_scheduler_steps=steps)
    t_ready = time.perf_counter() - t_ready
    llm_module.gc = gc
    reqs = workload(512)
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    sps = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0, detokenize=False) for _, o in reqs]
    llm.generate(prompts[:8], sps[:8], use_tqdm=False)
    late_before = len(_late_compiles())
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
    # the GPU's side: an event before and after each step's launch on the runner's stream (the
    # current one); a gap from one step's end event to the next one's start is the GPU waiting
    # for the host
    executor = core.executor
    launch = executor.execute_model
    marks: list[tuple] = []

    def timed_launch(so, *args, **kwargs):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        try:
            return launch(so, *args, **kwargs)
        finally:
            e1.record()
            marks.append((e0, e1, so.num_scheduled_tokens if hasattr(so, "num_scheduled_tokens") else 0))

    if torch.cuda.is_available():
        executor.execute_model = timed_launch
    # the host's side: how long the engine thread waits for a step's sampled ids (the device
    # behind the host); ~0 a step means the host is the bound
    from pagedserve.worker import pending_output
    get, waits = pending_output.PendingRunnerOutput.get, []

    def timed_get(self):
        w0 = time.perf_counter()
        if self.event is not None and not self.event.query():
            self.event.synchronize()
        waits.append(time.perf_counter() - w0)
        return get(self)

    pending_output.PendingRunnerOutput.get = timed_get
    pauses = GcPauses()
    cpu0, t0, wall0 = time.thread_time(), time.perf_counter(), time.time()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    dt = time.perf_counter() - t0
    gc_run = pauses.take()
    pauses.close()
    cpu = time.thread_time() - cpu0
    wall1 = time.time()
    core.step = step
    executor.execute_model = launch
    pending_output.PendingRunnerOutput.get = get
    if marks:
        torch.cuda.synchronize()
    spans = [a.elapsed_time(b) for a, b, _ in marks]
    gaps = [max(0.0, marks[i][1].elapsed_time(marks[i + 1][0])) for i in range(len(marks) - 1)]
    tokens = [_total(n) for _, _, n in marks]
    small = [sp for sp, n in zip(spans, tokens) if n <= 512]
    ms = sorted(s * 1e3 for s in steps)
    res = dict(out_tok_s=round(sum(len(o.outputs[0].token_ids) for o in outs) / dt, 1), wall_s=round(dt, 3),
               steps=len(ms), step_ms_median=round(statistics.median(ms), 3), step_ms_p90=round(ms[int(0.9 * len(ms))], 3),
               step_ms_max=round(ms[-1], 1), in_steps_s=round(sum(ms) / 1e3, 3),
               over_20ms_s=round(sum(m for m in ms if m > 20) / 1e3, 3),
               engine_thread_cpu_over_wall=round(cpu / dt, 3), gpu_launches=len(marks), freeze=freeze,
               ready_s=round(t_ready, 2), frozen_objects=gc.get_freeze_count(),
               gc_ms={g: [gc_run["counts"][g], gc_run["ms"][g], gc_run["longest_ms"][g]] for g in range(3)},
               gpu_span_s=round(sum(spans) / 1e3, 3), gpu_idle_between_s=round(sum(gaps) / 1e3, 3),
               gpu_gaps_over_0_1ms=sum(g > 0.1 for g in gaps), decode_span_ms_median=round(statistics.median(small), 3)
               if small else None, decode_span_s=round(sum(small) / 1e3, 3),
               **(clocks(smi_path, wall0, wall1) if smi_path else {}),
               host_wait_s=round(sum(waits), 3), host_wait_ms_median=round(statistics.median(waits) * 1e3, 3)
               if waits else None,
               prefill_gaps_s=round(sum(g for (_, _, n), g in zip(marks, gaps) if _total(n) > 512) / 1e3, 3),
               lmhead_pad=_lmhead_pad(),
               # Triton compiles inside the timed run: specialisations start-up did not take (each stalls its step)
               late_compiles=[[name, round(sec, 2)] for name, sec in _late_compiles()[late_before:]],
               # [launch index, tokens, GPU span ms] of the three longest launches (a stall shows which step)
               longest_launches=[[i, tokens[i], round(spans[i], 1)]
                                 for i in sorted(range(len(spans)), key=spans.__getitem__)[-3:][::-1]],
               per_step=[[n, round(sp, 3), round(g, 3)] for n, sp, g in zip(tokens, spans, gaps + [0.0])])
    llm.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--ab", action="store_true", help="odd runs without LLM()'s start-up collect + freeze")
    ap.add_argument("--no-lmhead-pad", action="store_true",
                    help="the LM head outside the graphs at its own row count (before session 18's a12b9ed)")
    ap.add_argument("--no-smi", action="store_true", help="no nvidia-smi polling (its driver queries may stall)")
    ap.add_argument("--fused-max", type=int, default=None,
                    help="TritonBackend.fused_decode_max_seqs for these runs (the library's when not given)")
    ap.add_argument("--no-heads-first", action="store_true",
                    help="triton_paged_attention.DECODE_HEADS_FIRST off (the decode grid before session 31)")
    ap.add_argument("--mbt", type=int, default=None, help="max_num_batched_tokens (the library's default when not given)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="kv_cache_dtype (auto: the model's)")
    ap.add_argument("--steps", type=int, default=None,
                    help="num_scheduler_steps (decode windows; the library's default when not given). With windows "
                         "the per-step figures are per schedule")
    args = ap.parse_args()
    if args.no_heads_first:
        from pagedserve.attention import triton_paged_attention
        triton_paged_attention.DECODE_HEADS_FIRST = False
    if args.fused_max is not None:
        from pagedserve.attention.backend import TritonBackend
        TritonBackend.fused_decode_max_seqs = args.fused_max
    os.makedirs(args.out, exist_ok=True)
    if args.no_lmhead_pad:
        from pagedserve.worker.cuda_graph import CudaGraphRunner
        CudaGraphRunner.logits_rows = lambda self, rows: rows
    smi_path = None if args.no_smi else os.path.join(args.out, "smi.csv")
    smi = None if args.no_smi else subprocess.Popen(["bash", "-c", "while true; do echo \"$(date +%s.%N), $(nvidia-smi --query-gpu=clocks.sm,"
                            "power.draw --format=csv,noheader,nounits)\"; sleep 0.1; done"],
                           stdout=open(smi_path, "w"), stderr=subprocess.DEVNULL)
    results = dict(date=time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), machine=torch.cuda.get_device_name(0),
                   model=args.model, load_avg_start=os.getloadavg(), heads_first=not args.no_heads_first,
                   max_num_batched_tokens=args.mbt, num_scheduler_steps=args.steps, runs=[])
    try:
        for i in range(args.runs):
            res = one_run(args.model, smi_path, freeze=not (args.ab and i % 2), mbt=args.mbt,
                          kv_cache_dtype=args.kv_cache_dtype, steps=args.steps)
            res["load_avg"] = os.getloadavg()
            log(f"run {i + 1}: {json.dumps({k: v for k, v in res.items() if k != 'per_step'})}")
            results["runs"].append(res)
            gc.collect()
            torch.cuda.empty_cache()
            with open(os.path.join(args.out, "thr_spread.json"), "w") as f:
                json.dump(results, f, indent=1)
    finally:
        if smi is not None:
            smi.kill()


if __name__ == "__main__":
    main()
