"""Piecewise CUDA graphs for MIXED steps (issue 22; worker/cuda_graph.py, PAGEDSERVE_MIXED_GRAPHS=1):
correctness and per-step timing on one engine, graphs on vs off (the runner's
`graph_runner.mixed.enabled` switch: same weights, same KV cache, same process).

    PYTHONPATH=$PWD python3 benchmarks/mixed_gpu.py [--model llama-8b] [--cpu-smoke]

1. start-up: `LLM()` of peers.py's `--model` (dummy weights, bf16, max_model_len 2048) with
   mixed graphs on: its wall time and the mixed pieces' share of the capture.
2. correctness: 16 requests decoding while 12 new prompts (64-1000 tokens, some sharing a
   prefix: cached context) arrive two steps apart, greedy; run with the mixed graphs and
   again eagerly: the token ids of every request are compared (a mismatch is printed with
   where it starts; the largest difference of the logits, first 8192 of the vocab, step by
   step: the graphs' matmuls run on the padded bucket's rows, which cuBLAS may round
   differently). Must hold: the first 8 mixed replays equal, bit for bit, the same pieces run
   eagerly on the same padded inputs (the capture is right), and the mixed graphs served
   mixed steps only when switched on.
3. timing: D running decodes + one new prompt of L tokens (16 + 544 fresh, 16 + 544 half
   cached, 32 + 1000 fresh): each step's wall time (device synchronised before and after, so host launch
   + device), medians of mixed steps and of the decode steps between them, graphs on vs off.
4. any "compiling Triton kernels ahead failed" in the log fails the run (exit 1).
Prints `RESULT {json}` lines and a table; $OUT/mixed_gpu.json when OUT is set.
On an H200, llama-8b: ~30 s start-up (cold Triton cache) + ~40 s; budget 100 s.
--cpu-smoke: a tiny llama on the CPU, to prove the script runs (no CUDA graphs there: the "graph"
arm replays by running the same pieces eagerly, emulate_graphs).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
os.environ.setdefault("PAGEDSERVE_MIXED_GRAPHS", "1")

FAIL_TEXT = "compiling Triton kernels ahead failed"


class LogWatch(logging.Handler):
    """Keeps every pagedserve log message (the capture line, compile-ahead failures)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def emit(**kw) -> None:
    print("RESULT " + json.dumps(kw), flush=True)


class StepClock:
    """Wraps the executor's execute_model: each step synchronised before and after (host +
    device wall time), its kind (decode rows, prefill tokens) and whether the mixed graphs ran."""

    def __init__(self, llm, torch) -> None:
        self.torch, self.cuda = torch, torch.cuda.is_available()
        self.executor = llm.engine.core.executor
        self.runner = self.executor.runner
        self.steps: list[dict] = []
        self.mixed_runs = 0
        self.logits: list | None = None   # per step, the logits (CPU float) when recording
        self.replay_checks_left, self.replay_checks = 0, []
        graphs = self.runner.graph_runner
        if graphs is not None:
            run_mixed = graphs.mixed.run

            def counted(inputs):
                self.mixed_runs += 1
                hidden = run_mixed(inputs)
                if self.replay_checks_left > 0:
                    self.replay_checks_left -= 1
                    hidden = hidden.clone()
                    try:
                        self.replay_checks.append(replay_check(graphs, inputs, hidden, torch))
                    except Exception as exc:   # noqa: BLE001 - reported, the run goes on
                        self.replay_checks.append(dict(error=f"{type(exc).__name__}: {exc}"))
                return hidden
            graphs.mixed.run = counted
        compute_logits = self.runner.model.compute_logits

        def recorded(hidden):
            out = compute_logits(hidden)
            if self.logits is not None and out is not None and len(self.logits) < 200:
                self.logits.append(out[:, :8192].float().cpu())   # the first 8192 of the vocab: 200 steps < 200 MB
            return out
        self.runner.model.compute_logits = recorded
        execute = self.executor.execute_model

        def timed(so, *args, **kwargs):
            if self.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = execute(so, *args, **kwargs)
            if hasattr(out, "get") and not hasattr(out, "sampled_token_ids"):
                out = out.get()   # pending: wait for it inside the timed span
            if self.cuda:
                torch.cuda.synchronize()
            counts = list(so.num_scheduled_tokens.values())
            self.steps.append(dict(ms=(time.perf_counter() - t0) * 1e3, decodes=sum(c == 1 for c in counts),
                                   prefill=sum(c for c in counts if c > 1)))
            return out
        self.executor.execute_model = timed

    def set_graphs(self, on: bool) -> None:
        if self.runner.graph_runner is not None:
            self.runner.graph_runner.mixed.enabled = on


def emulate_graphs(llm) -> None:
    """--cpu-smoke: no CUDA graphs on the CPU, so the runner gets an uncaptured graph runner
    whose "replay" runs the pieces eagerly: every path of this script (the mixed-step count,
    the replay check, the switch) runs as on the GPU."""
    runner = llm.engine.core.executor.runner
    graphs = runner.make_graph_runner()
    assert graphs.mixed.buckets, "PAGEDSERVE_MIXED_GRAPHS did not reach the runner"
    graphs.mixed.graphs = {size: [] for size in graphs.mixed.buckets}

    def replay(inputs):
        num = inputs.input_ids.shape[0]
        size = next(s for s in graphs.mixed.buckets if s >= num)
        graphs._copy_tokens(inputs, size)
        return graphs.mixed.forward(size, None, inputs.meta)[1][:num]
    graphs.mixed.run = replay
    runner.graph_runner = graphs


def replay_check(graphs, inputs, replayed, torch) -> dict:
    """The step again through the same pieces run eagerly (`MixedGraphs.forward` with the step's
    metadata, same padded bucket, so the same shapes and kernels): must equal the replay bit
    for bit. Rewrites the step's KV entries (with the same values when it does)."""
    num = inputs.input_ids.shape[0]
    size = next(s for s in graphs.mixed.buckets if s >= num)
    graphs._copy_tokens(inputs, size)
    _, eager = graphs.mixed.forward(size, None, inputs.meta)
    eager = eager[:num]
    return dict(tokens=num, bucket=size, decodes=inputs.meta.num_decodes, equal=bool(torch.equal(replayed, eager)),
                max_abs=float((replayed.float() - eager.float()).abs().max()))


def correctness_requests(smoke: bool):
    import random
    rng = random.Random(7)
    vocab = 1000 if smoke else 32000
    decodes = [[rng.randrange(3, vocab) for _ in range(rng.randint(40, 200))] for _ in range(16)]
    shared = [rng.randrange(3, vocab) for _ in range(512)]
    arrivals = []
    for i in range(12):
        n = [64, 300, 544, 1000, 128, 700][i % 6] if not smoke else [40, 90, 150][i % 3]
        fresh = [rng.randrange(3, vocab) for _ in range(n)]
        arrivals.append(shared[:min(n // 2, 512)] + fresh[min(n // 2, 512):] if i % 3 == 2 else fresh)
    return decodes, arrivals


def run_workload(llm, clock: StepClock, graphs_on: bool, smoke: bool, tag: str) -> dict[str, list[int]]:
    """The correctness workload; the token ids of every request."""
    from pagedserve import SamplingParams
    engine = llm.engine
    clock.set_graphs(graphs_on)
    decodes, arrivals = correctness_requests(smoke)
    long_sp = SamplingParams(max_tokens=12 if smoke else 64, ignore_eos=True, temperature=0.0, detokenize=False)
    short_sp = SamplingParams(max_tokens=6 if smoke else 16, ignore_eos=True, temperature=0.0, detokenize=False)
    for i, prompt in enumerate(decodes):
        engine.add_request(f"{tag}d{i}", {"prompt_token_ids": prompt}, long_sp)
    while engine.core.scheduler.waiting or any(not r.output_token_ids for r in engine.core.scheduler.running):
        engine.step()
    clock.logits = []
    ids: dict[str, list[int]] = {}
    step, pending = 0, list(enumerate(arrivals))
    while engine.has_unfinished_requests() or pending:
        if pending and step % 2 == 0:
            i, prompt = pending.pop(0)
            engine.add_request(f"{tag}p{i}", {"prompt_token_ids": prompt}, short_sp)
        for out in engine.step():
            if out.finished:
                ids[out.request_id[len(tag):]] = list(out.outputs[0].token_ids)
        step += 1
    return ids


def timing(llm, clock: StepClock, graphs_on: bool, smoke: bool, num_decodes: int, prompt_len: int,
           cached: bool, reps: int) -> dict:
    import random
    from pagedserve import SamplingParams
    engine = llm.engine
    clock.set_graphs(graphs_on)
    clock.logits = None
    rng = random.Random(num_decodes * 7919 + prompt_len * 2 + int(graphs_on))   # no prefix hits across arms
    vocab = 1000 if smoke else 32000
    sp = SamplingParams(max_tokens=100000, ignore_eos=True, temperature=0.0, detokenize=False)
    one = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0, detokenize=False)
    tag = f"t{int(graphs_on)}_{num_decodes}_{prompt_len}_{int(cached)}_"
    for i in range(num_decodes):
        engine.add_request(f"{tag}d{i}", {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(100)]}, sp)
    while engine.core.scheduler.waiting or any(not r.output_token_ids for r in engine.core.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    mixed, decode = [], []
    prev = [rng.randrange(3, vocab) for _ in range(prompt_len)]
    for rep in range(reps):
        fresh = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        prompt = prev[:prompt_len // 2] + fresh[prompt_len // 2:] if cached else fresh
        prev = prompt
        engine.add_request(f"{tag}p{rep}", {"prompt_token_ids": prompt}, one)
        start = len(clock.steps)
        for _ in range(4):
            engine.step()
        for s in clock.steps[start:]:
            if s["prefill"] and s["decodes"]:
                mixed.append(s)
            elif not s["prefill"]:
                decode.append(s["ms"])
    for i in range(num_decodes):
        engine.abort_request(f"{tag}d{i}")
    while engine.has_unfinished_requests():
        engine.step()
    skip = 1 if len(mixed) > 2 else 0   # the first: warm-up
    return dict(graphs=graphs_on, decodes=num_decodes, prompt=prompt_len, cached=cached,
                mixed_steps=len(mixed) - skip, mixed_tokens=statistics.median(s["prefill"] + s["decodes"] for s in mixed),
                mixed_ms=round(statistics.median(s["ms"] for s in mixed[skip:]), 3),
                mixed_min_ms=round(min(s["ms"] for s in mixed[skip:]), 3),
                decode_ms=round(statistics.median(decode), 3) if decode else None)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-8b")
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    smoke = args.cpu_smoke
    t_import = time.perf_counter()
    import torch
    from step_profile import make_llm
    from pagedserve.worker import mixed_graphs
    watch = LogWatch()
    logging.getLogger("pagedserve").addHandler(watch)
    mixed_capture_s = [0.0]
    capture_mixed = mixed_graphs.MixedGraphs.capture

    def timed_capture(self, stream):
        t0 = time.perf_counter()
        capture_mixed(self, stream)
        if stream is not None:
            torch.cuda.synchronize()
            mixed_capture_s[0] += time.perf_counter() - t0
    mixed_graphs.MixedGraphs.capture = timed_capture
    t0 = time.perf_counter()
    llm = make_llm(smoke, args.model, 2048, **({"async_scheduling": True} if smoke else {}))   # as on CUDA
    startup_s = time.perf_counter() - t0
    graphs = llm.engine.core.executor.runner.graph_runner
    emit(phase="startup", model="tiny-cpu" if smoke else args.model, llm_s=round(startup_s, 2),
         import_s=round(t0 - t_import, 2), mixed_capture_s=round(mixed_capture_s[0], 2),
         mixed_buckets=len(graphs.mixed.graphs) if graphs else 0,
         pieces_per_bucket=len(graphs.mixed.attention_calls) + 1 if graphs else 0,
         capture_log=[m for m in watch.messages if m.startswith("captured") or "failed" in m])
    failed = []
    if smoke:
        emulate_graphs(llm)
    clock = StepClock(llm, torch)

    # 2. correctness: graphs on (the first 8 mixed replays checked against the same pieces run
    # eagerly), then eager, the same workload
    clock.replay_checks_left = 8
    ids_on = run_workload(llm, clock, True, smoke, "on")
    clock.replay_checks_left = 0
    logits_on, runs_on = clock.logits, clock.mixed_runs
    ids_off = run_workload(llm, clock, False, smoke, "off")
    logits_off, runs_off = clock.logits, clock.mixed_runs - runs_on
    same = [k for k in ids_on if ids_on[k] == ids_off.get(k)]
    diffs = [k for k in ids_on if k not in same]
    first = {k: next((i for i, (x, y) in enumerate(zip(ids_on[k], ids_off[k])) if x != y), None) for k in diffs}
    max_diff = None
    steps = min(len(logits_on), len(logits_off))
    per_step = [float((a - b).abs().max()) for a, b in zip(logits_on[:steps], logits_off[:steps]) if a.shape == b.shape]
    if per_step:
        max_diff = max(per_step)
    replays_equal = all(c.get("equal") for c in clock.replay_checks)
    ok = replays_equal and (smoke or (runs_on > 0 and len(clock.replay_checks) > 0)) and runs_off == 0
    emit(phase="correctness", replay_checks=clock.replay_checks, replays_bitwise_equal=replays_equal,
         requests=len(ids_on), identical=len(same), mismatched=diffs[:8],
         first_mismatch_token=first, mixed_graph_steps=runs_on, mixed_graph_steps_when_off=runs_off,
         logits_steps_compared=len(per_step), logits_max_abs_diff=max_diff,
         logits_max_abs_diff_first_20=[round(d, 4) for d in per_step[:20]], ok=ok)
    if not ok:
        failed.append("correctness")

    # 3. timing, graphs off / on interleaved per configuration
    rows = []
    configs = [(16, 544, False), (16, 544, True), (32, 1000, False)]
    if smoke:
        configs = [(4, 150, False), (4, 150, True)]
    for num_decodes, prompt_len, cached in configs:
        for on in (False, True):
            row = timing(llm, clock, on, smoke, num_decodes, prompt_len, cached, 3 if smoke else args.reps)
            rows.append(row)
            emit(phase="timing", **row)
    print("\n| decodes | prompt | cached | mixed tokens | mixed ms eager | mixed ms graphs | decode ms eager | "
          "decode ms graphs |\n|---|---|---|---|---|---|---|---|")
    for off, on in zip(rows[::2], rows[1::2]):
        print(f"| {off['decodes']} | {off['prompt']} | {off['cached']} | {off['mixed_tokens']} | {off['mixed_ms']} | "
              f"{on['mixed_ms']} | {off['decode_ms']} | {on['decode_ms']} |")
    bad = [m for m in watch.messages if FAIL_TEXT in m]
    if bad:
        failed.append("compile_ahead")
        print(f"FAIL: {FAIL_TEXT!r} in the log:\n" + "\n".join(bad[:5]), flush=True)
    emit(phase="done", failed=failed)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "mixed_gpu.json"), "w") as f:
            json.dump(dict(rows=rows, log=watch.messages[-200:]), f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
