"""Issue 22, session 8 (branch flash22): the Triton prefill attention kernel's launch variants on
sm_90, then llama-8b end to end with the new default against the old one in one process.

    PYTHONPATH=$PWD python3 benchmarks/flash_gpu.py [--stages check,micro,engine] [--cpu-smoke]

Stages (check always runs first and exits 1 on any failure):
  check   attn_gpu.py's check (TritonBackend's paths and the paged kernel, bf16 and fp32, against
          the fp32 torch reference), then every variant below on a ragged launch (chunks after
          cached contexts and fresh prompts, on and off tile edges, K/V as fused-qkv views)
          against the fp32 reference (bf16 tolerance 3e-2).
  micro   each variant's TFLOP/s (causal FLOP, Hq 32 / Hkv 8 / D 128, bf16, block 16, shuffled
          block table): chunk8k after 4k / 8k / 12k of context, fresh16k, and a long64-like launch
          of two sequences (3,000 new after 9,000 cached + a fresh 5,192); beside them, for one
          sequence, the context gathered to contiguous K/V first (triton_by_sequence, default
          tiles) and torch's cuDNN by sequence.
  engine  llama-8b dummy, max_model_len 32768: ttft16k (3 fresh prompts, median) with the default
          backend (cuDNN takes a 16k prompt's aligned chunks) and with every chunk in one Triton
          launch (triton_prefill), old and new tiles; then long64 (peers_long.py's requests) new,
          old, new on the default backend with every step recorded (step_profile.StepRecorder):
          wall, prefill steps x ms, decode tail.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--cpu-smoke", action="store_true")
ap.add_argument("--stages", default="check,micro,engine")
ARGS, _ = ap.parse_known_args()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attn_common  # noqa: E402  (attn_gpu.py's; parses --cpu-smoke itself: the same SMOKE, DEV and head shapes)
import torch  # noqa: E402

from attn_engine import GATHERED, SDPA, TRITON, EngineStages  # noqa: E402
from attn_common import Paged, bench_ms, causal_flop, emit  # noqa: E402
from pagedserve.attention import triton_prefill_attention as tpa  # noqa: E402
from pagedserve.attention.triton_prefill_attention import PrefillTiles  # noqa: E402
from step_profile import StepRecorder, long64_requests  # noqa: E402

SMOKE = attn_common.SMOKE
DTYPE = torch.float32 if SMOKE else torch.bfloat16
# the tile shape of every launch before session 8 (its loop that read block ids in the tile, the
# "old" rows of RESULTS.md, was deleted after that session)
OLD = PrefillTiles(128, 64, 8, 3)
VARIANTS = {
    "pf_128x64": OLD,
    "pf_128x64_s4": PrefillTiles(128, 64, 8, 4),
    "pf_128x128": PrefillTiles(128, 128, 8, 3),  # LARGE_TILES
    "pf_128x128_s2": PrefillTiles(128, 128, 8, 2),
}
if SMOKE:  # interpreter-sized tiles
    VARIANTS = {"pf_32x16": PrefillTiles(32, 16, 4, 1), "pf_32x32": PrefillTiles(32, 32, 4, 1)}
SUMMARY: list[str] = []


@contextlib.contextmanager
def tiles_mode(name: str):
    """'new': the module's defaults (LARGE_TILES / SMALL_TILES by launch size); 'old': OLD's tile shape everywhere."""
    saved = (tpa.LARGE_TILES, tpa.SMALL_TILES)
    if name == "old":
        tpa.LARGE_TILES = tpa.SMALL_TILES = OLD
    try:
        yield name
    finally:
        tpa.LARGE_TILES, tpa.SMALL_TILES = saved


def stage_check() -> bool:
    ok = attn_common.stage_check()
    qls, cls = ([40, 7, 90, 33], [30, 0, 17, 64]) if SMOKE else \
        ([300, 1000, 37, 2048, 513, 700], [0, 3000, 100, 1500, 129, 4097])
    b = Paged(qls, cls, DTYPE, seed=11)
    b.as_fused_qkv_views()
    ref = b.reference_fp32()
    tol = 2e-4 if SMOKE else 3e-2
    for name, tiles in VARIANTS.items():
        got = b.prefill(torch.full_like(b.query, float("nan")), tiles=tiles)
        err = float((got.float() - ref).abs().max())
        passed = math.isfinite(err) and err <= tol
        emit(stage="flash_check", variant=name, max_abs_err_vs_fp32_ref=err, tol=tol, passed=passed)
        ok &= passed
    return ok


def stage_micro() -> None:
    cases = [("chunk150_after150", [150], [150]), ("fresh300", [300], [0]), ("two_seqs", [70, 130], [200, 0])] \
        if SMOKE else [("chunk8k_after4k", [8192], [4096]), ("chunk8k_after8k", [8192], [8192]),
                       ("chunk8k_after12k", [8192], [12288]), ("fresh16k", [16384], [0]),
                       ("long64_like", [3000, 5192], [9000, 0])]
    table = {}
    for label, qls, cls in cases:
        b = Paged(qls, cls, DTYPE, seed=3)
        flop = causal_flop(qls, cls)
        out = torch.empty_like(b.query)
        base = b.prefill(torch.empty_like(b.query), tiles=OLD).float()
        timings = {}
        for name, tiles in VARIANTS.items():
            diff = float((b.prefill(out, tiles=tiles).float() - base).abs().max())
            if not diff <= (2e-4 if SMOKE else 3e-2):
                raise RuntimeError(f"{label}: {name} differs from {OLD} by {diff}")
            timings[name] = bench_ms(lambda: b.prefill(out, tiles=tiles))
        if len(qls) == 1:
            timings["gathered_default"] = bench_ms(lambda: b.triton_by_sequence(out))
            timings["cudnn_by_sequence"] = bench_ms(lambda: b.sdpa_by_sequence(out))
        for name, ms in timings.items():
            tflops = round(flop / (ms * 1e-3) / 1e12, 1)
            emit(stage="flash_micro", case=label, variant=name, ms=round(ms, 3), tflops=tflops)
            table.setdefault(name, {})[label] = tflops
        b = out = base = None  # freed before the next case
        if not SMOKE:
            torch.cuda.empty_cache()
    labels = [c[0] for c in cases]
    SUMMARY.append("micro TFLOP/s: " + " | ".join(labels))
    for name, row in table.items():
        SUMMARY.append(f"  {name:<20} " + " ".join(f"{row.get(lb, ''):>8}" for lb in labels))


def stage_engine() -> None:
    current = {"tiles": None}

    def emit_tagged(**kw):
        emit(tiles=current["tiles"], **kw)
        if kw.get("median_ms") is not None:
            SUMMARY.append(f"{kw['workload']} {kw['mode']} tiles {current['tiles']}: median {kw['median_ms']} ms "
                           f"of {kw['ms']}")

    stages = EngineStages(SMOKE, emit_tagged, os.environ.get("OUT"))
    t0 = time.time()
    llm = stages.make_llm()
    emit(stage="flash_engine", startup_s=round(time.time() - t0, 1))
    rng = random.Random(7)
    for mode, tiles in ((SDPA, "new"), (TRITON, "new"), (TRITON, "old"), (GATHERED, "new")):
        with tiles_mode(tiles):
            current["tiles"] = tiles
            stages.engine(llm, rng, modes=(mode,), profiles=False)
    from pagedserve import SamplingParams
    reqs = long64_requests(SMOKE)
    params = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0, detokenize=False) for _, o in reqs]
    recorder = StepRecorder(llm.engine.core)
    for run, tiles in enumerate(("new", "old", "new")):
        # each run shifts every first token: the same lengths, no prefix-cache hit on an earlier run
        prompts = [{"prompt_token_ids": [3 + (p[0] + 7 + run) % 31990] + p[1:]} for p, _ in reqs]
        with tiles_mode(tiles):
            recorder.rows = []
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            end = time.perf_counter()
        gen = sum(len(o.outputs[0].token_ids) for o in outs)
        steps = recorder.summary(end)
        pre, tail = steps["prefill_steps"], steps["decode_tail"]
        emit(stage="flash_long64", run=run, tiles=tiles, wall_s=round(end - t0, 2), out_tok_s=round(gen / (end - t0), 1),
             prefill_steps=pre["steps"], prefill_ms_per_step=pre["ms_per_step"], prefill_s=pre["s"],
             decode_tail_steps=tail["steps"], decode_tail_ms_per_step=tail["ms_per_step"], steps=steps)
        SUMMARY.append(f"long64 run {run} tiles {tiles}: wall {end - t0:.2f} s, prefill {pre['steps']} x "
                       f"{pre['ms_per_step']} ms, decode tail {tail['steps']} x {tail['ms_per_step']} ms")
    llm.shutdown()


def main() -> None:
    stages = set(ARGS.stages.split(","))
    if not SMOKE:
        import triton
        emit(stage="env", device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    if not stage_check():
        print("CORRECTNESS FAILED: a variant or path is wrong; timings skipped", flush=True)
        sys.exit(1)
    if "micro" in stages:
        stage_micro()
    if "engine" in stages:
        stage_engine()
    print("\n== flash_gpu summary\n" + "\n".join(SUMMARY), flush=True)
    emit(stage="flash_done", total_s=round(time.time() - attn_common.T_START, 1))


if __name__ == "__main__":
    main()
