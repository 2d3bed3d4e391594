"""Issue 22, long64: why its prefill attention runs below the micro-benchmark's rate. Session 15's
kernel profile of long64's prefill steps 20-27 read 77.5 ms a step in the Triton prefill kernel
(~2.4e13 FLOP a step on average: ~310-345 TFLOP/s) where flash_gpu.py's micro stage reads 436-467
TFLOP/s on chunks after a cached context; the GEMMs 172 ms a step (~665 TFLOP/s). Either the
step's launch shapes are slower than the micro's (short chunks on long contexts, ragged
sequences) or the engine's conditions are (clocks under the GEMMs' power, a cold L2, the cache's
layout). This script tells them apart in one process:

  1. long64 (peers_long.py's requests, llama-8b dummy, max_model_len 32768) with every Triton
     prefill launch timed in the engine by CUDA events and its shape recorded (each sequence's new
     tokens and cached context);
  2. after the engine is gone, each distinct launch shape replayed alone (attn_common.Paged: a
     shuffled block table, do_bench with a flushed L2): in-engine ms against isolated ms;
  3. the step's four GEMMs alone at the median prefill step's tokens (x 32 layers) against the
     engine's 172 ms;
  and nvidia-smi's SM clock, power and temperature sampled every 200 ms throughout, summarised
  per phase (engine run, attention replays, GEMMs).

    PYTHONPATH=$PWD python3 benchmarks/long64_attention.py [--cpu-smoke]

Needs `.devcarry/peers.py` (or ../shared/bench/peers.py). ~90-120 s on an H200.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attn_common  # noqa: E402  (parses --cpu-smoke: SMOKE, DEV, head shapes)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attn_common import Paged, bench_ms, causal_flop, emit  # noqa: E402
from decode_common import weight_shapes  # noqa: E402
from pagedserve.attention.backend import TritonBackend  # noqa: E402
from step_profile import long64_requests, make_llm  # noqa: E402

SMOKE = attn_common.SMOKE
DTYPE = torch.float32 if SMOKE else torch.bfloat16
OUT = os.environ.get("OUT", "/tmp/long64_attention")
PHASES: list[tuple[str, float]] = []


def phase(name: str) -> None:
    PHASES.append((name, time.time()))
    print(f"PHASE {name} {time.time():.1f}", flush=True)


class LaunchTimer:
    """Wraps TritonBackend._triton_prefill: each launch's (query_len, context_len) per sequence
    and a pair of CUDA events around it (host lists from the step's metadata)."""

    def __init__(self) -> None:
        self.records: list[tuple[tuple, object, object]] = []
        self.original = TritonBackend._triton_prefill
        timer = self

        def timed(backend, query, key, value, k_cache, v_cache, meta, scale, out, seq_begin, seq_end, max_tokens):
            qsl = meta.query_start_loc_host if meta.query_start_loc_host is not None else meta.query_start_loc.tolist()
            lens = meta.seq_lens_host if meta.seq_lens_host is not None else meta.seq_lens.tolist()
            shape = tuple((int(qsl[s + 1] - qsl[s]), int(lens[s] - (qsl[s + 1] - qsl[s])))
                          for s in range(seq_begin, seq_end))
            start = timer._event()
            result = timer.original(backend, query, key, value, k_cache, v_cache, meta, scale, out, seq_begin,
                                    seq_end, max_tokens)
            end = timer._event()
            timer.records.append((shape, start, end))
            return result

        TritonBackend._triton_prefill = timed

    @staticmethod
    def _event():
        if SMOKE:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def restore(self) -> None:
        TritonBackend._triton_prefill = self.original

    def by_shape(self) -> dict[tuple, list[float]]:
        """shape -> in-engine ms of each launch of it (one per layer and step)."""
        if not SMOKE:
            torch.cuda.synchronize()
        out: dict[tuple, list[float]] = {}
        for shape, start, end in self.records:
            ms = (end - start) * 1e3 if SMOKE else start.elapsed_time(end)
            out.setdefault(shape, []).append(ms)
        return out


def engine_run() -> dict[tuple, list[float]]:
    from pagedserve import SamplingParams
    reqs = long64_requests(SMOKE)
    if SMOKE:   # the Triton backend on the CPU (interpreter), so that the timer has launches to see
        from pagedserve.worker import model_runner
        model_runner.select_backend = lambda device: TritonBackend()
    llm = make_llm(SMOKE, "llama-8b", 2048 if SMOKE else 32768)
    params = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0, detokenize=False) for _, o in reqs]
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    timer = LaunchTimer()
    phase("engine")
    t0 = time.perf_counter()
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        timer.restore()
    wall = time.perf_counter() - t0
    shapes = timer.by_shape()
    emit(stage="long64_engine", wall_s=round(wall, 2), launches=len(timer.records), shapes=len(shapes))
    llm.shutdown()
    del llm
    if not SMOKE:
        torch.cuda.empty_cache()
    return shapes


def replay(shapes: dict[tuple, list[float]]) -> None:
    """Each shape alone, against its in-engine launches."""
    phase("replay")
    tot_engine = tot_alone = tot_flop = 0.0
    for i, (shape, engine_ms) in enumerate(sorted(shapes.items(), key=lambda kv: -sum(kv[1]))):
        qls, cls = [q for q, _ in shape], [c for _, c in shape]
        if sum(qls) < (64 if SMOKE else 1024):   # the small launches (a chunk's tail) are not the question
            continue
        b = Paged(qls, cls, DTYPE, seed=i)
        out = torch.empty_like(b.query)
        alone = bench_ms(lambda: b.prefill(out))
        flop = causal_flop(qls, cls)
        med = statistics.median(engine_ms)
        tot_engine += sum(engine_ms)
        tot_alone += alone * len(engine_ms)
        tot_flop += flop * len(engine_ms)
        emit(stage="long64_launch", chunks=[list(s) for s in shape], calls=len(engine_ms),
             engine_ms=round(med, 3), engine_ms_min=round(min(engine_ms), 3), alone_ms=round(alone, 3),
             engine_tflops=round(flop / med / 1e9, 1), alone_tflops=round(flop / alone / 1e9, 1))
        b = out = None
        if not SMOKE:
            torch.cuda.empty_cache()
    if tot_engine:
        emit(stage="long64_replay_total", engine_s=round(tot_engine / 1e3, 2), alone_s=round(tot_alone / 1e3, 2),
             engine_tflops=round(tot_flop / tot_engine / 1e9, 1), alone_tflops=round(tot_flop / tot_alone / 1e9, 1))


def gemms(tokens: int) -> None:
    """The four products of a layer at `tokens` rows, alone (x 32 layers: a prefill step's GEMMs)."""
    phase("gemms")
    total, flop = 0.0, 0.0
    for name, (n, k) in weight_shapes("llama-8b").items():
        if name == "lm_head":   # a prefill step's LM head takes its sequences' last rows only
            continue
        if SMOKE:
            n, k = n // 64, k // 64
        x = torch.randn(tokens, k, device=attn_common.DEV).to(DTYPE)
        w = torch.randn(n, k, device=attn_common.DEV).to(DTYPE)
        ms = bench_ms(lambda: F.linear(x, w))
        total += ms
        flop += 2.0 * tokens * n * k
        emit(stage="long64_gemm", name=name, tokens=tokens, ms=round(ms, 3), tflops=round(2.0 * tokens * n * k / ms / 1e9, 1))
    emit(stage="long64_gemms", tokens=tokens, layer_ms=round(total, 3), step_ms_32_layers=round(32 * total, 1),
         tflops=round(flop / total / 1e9, 1))


def clocks_summary(path: str) -> None:
    """Median SM clock / power and the max temperature between consecutive phases."""
    import datetime
    rows = []
    for line in open(path):
        parts = [p.strip() for p in line.split(",")]
        try:
            t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            rows.append((t, float(parts[1].split()[0]), float(parts[2].split()[0]), float(parts[3])))
        except (ValueError, IndexError):
            continue
    bounds = PHASES + [("end", time.time())]
    for (name, t0), (_, t1) in zip(bounds, bounds[1:]):
        sel = [r for r in rows if t0 <= r[0] < t1]
        if sel:
            emit(stage="clocks", phase=name, samples=len(sel), sm_mhz_median=statistics.median(r[1] for r in sel),
                 sm_mhz_min=min(r[1] for r in sel), power_w_median=statistics.median(r[2] for r in sel),
                 power_w_max=max(r[2] for r in sel), temp_c_max=max(r[3] for r in sel))


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    smi = None
    clocks = os.path.join(OUT, "clocks.csv")
    if not SMOKE:
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu",
                                "--format=csv,noheader", "-lms", "200"], stdout=open(clocks, "w"))
    try:
        shapes = engine_run()
        replay(shapes)
        big = [sum(q for q, _ in s) for s in shapes if sum(q for q, _ in s) >= (64 if SMOKE else 1024)]
        gemms(int(statistics.median(big)) if big else 256)
    finally:
        if smi is not None:
            smi.terminate()
            smi.wait()
    if smi is not None:
        clocks_summary(clocks)


if __name__ == "__main__":
    main()
