"""The one-row W4A16 GEMV on the GPU machine (issue 18, sessions 8-9): old launches against new ones,
then llama-8b b1_decode with each, in one device call (<= 240 s). Four stages, each a child
process with its own time limit:

  gemv1     (<= 100 s) exactness first (`CHECK` lines, any failure or launch that does not
                       compile fails the run): every launch below at 1 and 3 rows on llama-8b's
                       shapes (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down
                       14336->4096; bf16, plus asymmetric zeros and (two launches) fp16 on qkv), each
                       with the prologue the decode step folds into it (RMSNorm + residual for
                       qkv / gate_up against RMSNorm then the launch; SiLU-and-mul for down
                       against SiluAndMul then the launch), the atomic launches' zeroed
                       scratch and counters left zero, and each launch run 8 times on one input
                       (`REPEAT`: the split-order launches must give the same bits every time).
                       Then the sweep (`SWEEP` lines: us per call in CUDA graphs, each call on
                       its own copy of the weights, 4x L2 in all, with the projection's prologue;
                       TB/s of int4 weights + scales): OLD = triton_w4a16_gemv.TUNED's one-row
                       launches (main's default: split K by fp32 atomics), ATOMIC = new atomic
                       launches (register prefetch, evict-first weights, other shapes), DET =
                       split K summed by the last program in split order (bitwise repeatable).
                       `BEST` per shape and group, `FLOOR` per layer; the best of all to
                       /tmp/w4_gemv_tuned.json, the best DET to /tmp/w4_gemv_det.json (copies
                       under $OUT). Launches may be swept on some projections only (ONLY).
  e2e_default (<= 45 s) llama-8b dummy W4A16 (compressed-tensors, symmetric, group 128, LM head
                       bf16) with the static TUNED (the default): b1_decode, then the one-row
                       graph's replay time and the linears' us per projection in an eager step.
  e2e_bf16  (<= 30 s)  bf16 b1_decode (main's default path), for the ratio.
  (gemv1 runs third: the two e2e figures first, in case the sweep runs out of time.)
  e2e_new   (<= 30 s)  W4A16 with the sweep's best launches.

    bash benchmarks/w4_gemv_gpu.sh                        (the device call)
    PYTHONPATH=$PWD python3 benchmarks/w4_gemv_gpu.py --cpu-smoke   the same code on CPU (interpreter)
    python3 benchmarks/w4_gemv_gpu.py STAGE [--cpu-smoke]           one stage in this process
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks import w4_gpu  # noqa: E402
from benchmarks.quant_gpu import FAILED, _rel, _report, emit  # noqa: E402
from benchmarks.w4_gpu import DEVICE, LAYERS, PROLOGUES, SHAPES, _copies, _name, _timer, _weights  # noqa: E402
from pagedserve.layers.quantization import triton_w4a16_gemv as t  # noqa: E402
from pagedserve.layers.quantization.triton_w4a16_gemv import GemvConfig  # noqa: E402

STAGES = {"e2e_default": 45, "e2e_bf16": 30, "gemv1": 100, "e2e_new": 30}   # the first e2e compiles cold
TUNED_FILE = "/tmp/w4_gemv_tuned.json"
DET_FILE = "/tmp/w4_gemv_det.json"
G = GemvConfig
STATIC = {key[1:]: config for key, config in t.TUNED.items() if key[0] == 1}   # (K, N) -> main's launch
ONLY: dict[GemvConfig, set] = {}   # launches swept on some projections only (the rest: on all)


def _only(layers: str, *configs: GemvConfig) -> list[GemvConfig]:
    for config in configs:
        ONLY.setdefault(config, set()).update(layers.split())
    return list(configs)


if SMOKE:
    OLD = [G(block_n=32, words=8, atomic=True)]
    ATOMIC = [G(block_n=32, words=8, atomic=True, prefetch=True, evict=True),
              *_only("down", G(block_n=16, atomic=True, prefetch=True))]
    DET = [G(block_n=32, words=8), G(block_n=32, words=8, prefetch=True, evict=True)]
    FP16 = ATOMIC[:1] + DET[1:2]
else:
    OLD = list(dict.fromkeys(STATIC.values()))   # the default (session 9's first call's best)
    PF = dict(prefetch=True, evict=True)   # registers double-buffered, weights evict-first
    GU = dict(block_n=256, num_warps=1, words=8, atomic=True)          # gate_up's: 8 columns a thread
    DN = dict(block_n=256, num_warps=2, words=8, atomic=True, **PF)    # down's and o's
    ATOMIC = [   # the runners-up of session 9's two calls (QUANT.md), each on its projection
        *_only("gate_up", G(**GU, programs_per_sm=6), G(**GU, programs_per_sm=8, num_stages=2),
               G(block_n=128, num_warps=1, words=8, atomic=True, programs_per_sm=16)),
        *_only("down", G(**DN, programs_per_sm=6), G(block_n=256, num_warps=2, words=8, atomic=True, prefetch=True),
               G(block_n=128, num_warps=1, words=8, atomic=True, programs_per_sm=8, **PF)),
        *_only("qkv", G(block_n=128, num_warps=1, words=8, atomic=True, programs_per_sm=12), G(**DN)),
        *_only("o", G(block_n=128, num_warps=1, words=8, atomic=True, programs_per_sm=8, **PF),
               G(**DN, programs_per_sm=3)),
    ]
    ATOMIC = [config for config in dict.fromkeys(ATOMIC) if config not in OLD]
    for (k, n), config in STATIC.items():   # the default launch on its own projection (and where listed above)
        _only(" ".join(name for name, kk, nn in SHAPES if (kk, nn) == (k, n)), config)
    # split-order sums of the default launches, each on its own projection: the launch-for-launch
    # cost of a bitwise repeatable one-row output
    DET = [dataclasses.replace(config, atomic=False) for config in OLD]
    for (k, n), config in STATIC.items():
        _only(" ".join(name for name, kk, nn in SHAPES if (kk, nn) == (k, n)), dataclasses.replace(config, atomic=False))
    FP16 = [G(**DN), DET[0]]
GROUPS = (("old", OLD), ("atomic", ATOMIC), ("det", DET))


def _scratch_clean(label: str) -> None:
    """The atomic launches leave their zeroed sums and the split-K counters zero."""
    dirty = sum(int(torch.count_nonzero(s)) for s in list(t._ZERO_SUMS.values()) + list(t._TILE_COUNTERS.values()))
    _report(f"{label} scratch left zero", float(dirty), 0.0)


def _fits(name: str, config: GemvConfig) -> bool:
    """A launch the step can run for this projection: its norm prologue sums split K in the
    kernel (fixup), or the step would not fuse the norm (w4a16_rms_norm_gemv returns None)."""
    return (config.fixup or PROLOGUES[name] != t.RMS_NORM_RESIDUAL) and name in ONLY.get(config, {name})


def _fused(name: str, config: GemvConfig, x: torch.Tensor, w4: tuple, norm_weight: torch.Tensor,
           residual: torch.Tensor):
    """(fused out, unfused reference out) for the projection's prologue with `config`."""
    from pagedserve.layers.activation import SiluAndMul
    from pagedserve.layers.norm import RMSNorm
    k = x.shape[1]
    if PROLOGUES[name] == t.SILU_AND_MUL:
        gate_up = torch.cat([x, residual], 1)
        return (t.w4a16_gemv(gate_up[:, :k], *w4, 128, config, prologue=t.SILU_AND_MUL),
                t.w4a16_gemv(SiluAndMul()(gate_up), *w4, 128, config))
    if PROLOGUES[name] == t.RMS_NORM_RESIDUAL:
        h = torch.empty_like(x)
        out = t.w4a16_gemv(x, *w4, 128, config, prologue=t.RMS_NORM_RESIDUAL, norm=(norm_weight, 1e-5, residual, h))
        norm = RMSNorm(k, 1e-5, x.dtype).to(DEVICE)
        norm.weight.data = norm_weight
        normed, h_ref = norm(x, residual.clone())
        if not torch.equal(h, h_ref):
            FAILED.append(f"{name} {_name(config)}: x + residual")
        return out, t.w4a16_gemv(normed, *w4, 128, config)
    return None


def _repeat(label: str, config: GemvConfig, x: torch.Tensor, w4: tuple) -> None:
    """One row through the launch 8 times on one input: how many differ from the first in any
    bit (`REPEAT`); a split-order (non-atomic) launch must give the same bits every time."""
    first = t.w4a16_gemv(x, *w4, 128, config)
    differ = sum(not torch.equal(first, t.w4a16_gemv(x, *w4, 128, config)) for _ in range(7))
    emit("REPEAT", launch=label, differ_of_7=differ, atomic=config.atomic)
    if differ and not config.atomic:
        FAILED.append(f"{label}: not repeatable ({differ} of 7 runs differ)")


def check_launches() -> set:
    """Every OLD, ATOMIC and DET launch against x.float() @ the dequantized weight (1e-2 relative: the
    bf16 output's own rounding is ~3e-3) at 1 and 3 rows, and its fused prologue against the
    unfused one (1e-2: the norm is rounded twice there, once here). Returns the failed labels."""
    from pagedserve.layers.quantization.int4 import dequantize_int4
    bad = set()
    for index, (name, k, n) in enumerate(SHAPES):
        variants = [(torch.float16 if SMOKE else torch.bfloat16, True)]
        if index == 0:
            variants += [(torch.float16, True), (torch.bfloat16 if not SMOKE else torch.float16, False)]
        for dtype, symmetric in variants:
            w4 = _weights(k, n, dtype, symmetric)
            weight = dequantize_int4(*w4, 128, None, dtype).float()
            configs = OLD + ATOMIC + DET if dtype != torch.float16 else FP16   # fp16: fewer compiles
            for config in [c for c in configs if _fits(name, c)]:
                label = f"{name} {str(dtype)[6:]} sym={symmetric} {_name(config)}"
                try:
                    for m in (1, 3):
                        x = torch.randn(m, k, device=DEVICE, dtype=dtype)
                        err = _rel(t.w4a16_gemv(x, *w4, 128, config), x.float() @ weight)
                        _report(f"w4 m={m} {label}", err, 1e-2)
                        bad |= {label} if err > 1e-2 else set()
                    if (dtype, symmetric) == variants[0]:
                        _repeat(label, config, x[:1], w4)
                        x, residual = (torch.randn(1, k, device=DEVICE, dtype=dtype) * 3 for _ in range(2))
                        pair = _fused(name, config, x, w4, torch.rand(k, device=DEVICE, dtype=dtype) + 0.5, residual)
                        if pair is not None:
                            err = float("inf") if pair[0] is None else _rel(*pair)
                            _report(f"w4 prologue {label}", err, 1e-2)
                            bad |= {label} if err > 1e-2 else set()
                except Exception as exc:   # a launch that does not compile fails the run, loudly
                    _report(f"w4 {label}", float("inf"), 1e-2, error=f"{type(exc).__name__}: {exc}"[:300])
                    bad.add(label)
        _scratch_clean(name)
    return bad


def sweep(bad: set) -> None:
    """Every launch at one row with its prologue, on rotated copies of the weights; the best
    old (main's static table and the old list) and new launch per shape."""
    best, chosen, chosen_det = {}, {}, {}
    totals = {"static": 0.0, "old": 0.0, "atomic": 0.0, "det": 0.0, "any": 0.0}
    for name, k, n in SHAPES:
        w4 = [_weights(k, n, torch.bfloat16 if not SMOKE else torch.float16, True, seed)
              for seed in range(_copies(k * n // 2))]
        w4_bytes = k * n // 2 + 2 * w4[0][1].numel() * w4[0][1].element_size()
        x = torch.randn(1, k, device=DEVICE, dtype=w4[0][1].dtype)
        times = {}
        for group, configs in GROUPS:
            for config in [c for c in configs if _fits(name, c)]:
                label = _name(config)
                if any(b.endswith(label) and b.startswith(name + " ") for b in bad):
                    continue   # failed its check (reported there)
                try:
                    ms = _timer(w4_gpu._with_prologue(name, x, w4, config), len(w4))
                except Exception as exc:
                    _report(f"sweep {name} {label}", float("inf"), 0.0, error=f"{type(exc).__name__}: {exc}"[:300])
                    continue
                times[(group, config)] = ms
                emit("SWEEP", layer=name, group=group, launch=label, us=round(ms * 1e3, 2),
                     tb_s=round(w4_bytes / ms / 1e9, 2), static=config == STATIC.get((k, n)))
        _scratch_clean(f"sweep {name}")
        if not times:
            continue
        static = times.get(("old", STATIC.get((k, n))))
        for group, _ in GROUPS:
            mine = {c: ms for (g, c), ms in times.items() if g == group}
            if mine:
                config, ms = min(mine.items(), key=lambda kv: kv[1])
                best[(name, group)] = (config, ms)
                totals[group] += ms
                emit("BEST", layer=name, group=group, us=round(ms * 1e3, 2), tb_s=round(w4_bytes / ms / 1e9, 2),
                     launch=_name(config))
        (group, config), ms = min(times.items(), key=lambda kv: kv[1])
        totals["any"] += ms
        totals["static"] += static if static is not None else float("nan")
        chosen[f"1,{k},{n}"] = dataclasses.asdict(config)
        emit("TUNED", layer=name, group=group, us=round(ms * 1e3, 2), static_us=round((static or 0) * 1e3, 2),
             tb_s=round(w4_bytes / ms / 1e9, 2), launch=_name(config))
        if (name, "det") in best:
            chosen_det[f"1,{k},{n}"] = dataclasses.asdict(best[(name, "det")][0])
        for path, table in ((TUNED_FILE, chosen), (DET_FILE, chosen_det)):
            for where in [path] + ([os.path.join(os.environ["OUT"], os.path.basename(path))]
                                   if os.environ.get("OUT") else []):
                with open(where, "w") as f:
                    json.dump({"gemv": table}, f)
    emit("FLOOR", **{f"{key}_layer_us": round(ms * 1e3, 1) for key, ms in totals.items()},
         step_saved_ms=round(LAYERS * (totals["static"] - totals["any"]), 3),
         note="sum over the 4 projections of the one-row launch (static: main's TUNED); saved: x layers")


def load_tuned(path: str) -> None:
    if not os.path.exists(path):
        FAILED.append(f"no {path}: the sweep did not run")
        return
    with open(path) as f:
        for key, config in json.load(f)["gemv"].items():
            t.TUNED[tuple(int(v) for v in key.split(","))] = GemvConfig(**config)
    emit("TUNED", loaded={str(key): _name(c) for key, c in t.TUNED.items() if key[0] == 1})


def e2e(stage: str) -> None:
    variant = "bf16" if stage == "e2e_bf16" else "w4a16"
    if stage == "e2e_new":
        load_tuned(TUNED_FILE)
    llm = w4_gpu.timed_engine(variant, ("b1_decode",))
    if llm is not None:
        w4_gpu.try_decode_profile(f"{variant}_{stage}", llm)


def warm(workers: int = 8, limit_s: float = 60.0) -> None:
    """Compile every launch before the checks, in `workers` processes at once (each runs the checks
    of every workers-th launch, its output dropped): Triton's on-disk cache then serves the checks,
    the sweep and the e2e stages, which compile one kernel at a time (~270 kernels here)."""
    import subprocess
    import time
    start = time.time()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "warm", str(i), str(workers)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(workers)]
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, limit_s - (time.time() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    emit("WARM", workers=workers, wall_s=round(time.time() - start, 1), exits=[proc.returncode for proc in procs])


def run_stage(stage: str) -> None:
    if stage == "gemv1":
        if not SMOKE:
            warm()
        bad = check_launches()
        print(f"CHECK_SUMMARY failed={len(FAILED)} {FAILED[:20]}", flush=True)
        sweep(bad)
    else:
        e2e(stage)
    print(f"STAGE_SUMMARY {stage} failed={len(FAILED)} {FAILED[:20]}", flush=True)
    sys.exit(1 if FAILED else 0)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--cpu-smoke"]
    if args and args[0] in STAGES:
        run_stage(args[0])
        return
    if len(args) == 3 and args[0] == "warm":   # one of warm()'s workers: every n-th launch of each list
        index, workers = int(args[1]), int(args[2])
        global OLD, ATOMIC, DET, FP16, GROUPS
        OLD, ATOMIC, DET, FP16 = (configs[index::workers] for configs in (OLD, ATOMIC, DET, FP16))
        GROUPS = (("old", OLD), ("atomic", ATOMIC), ("det", DET))
        check_launches()
        return
    if args:
        sys.exit(__doc__)
    log = open(os.path.join(os.environ["OUT"], "w4_gemv_gpu.txt"), "w") if os.environ.get("OUT") else None
    for path in (TUNED_FILE, DET_FILE):
        if os.path.exists(path):
            os.remove(path)
    failed = w4_gpu.run_stages(os.path.abspath(__file__), STAGES, log)
    lines = [line for line in open(log.name)] if log else []
    summary = [line.strip()[:400] for line in lines if line.startswith(("BEST", "TUNED", "FLOOR", "RESULT", "CHECK_SUMMARY",
                                                                         "STAGE "))
               or "linear_us_in_step" in line or "graph_replay" in line]
    print("==== SUMMARY\n" + "\n".join(summary) + f"\nFAILED_STAGES {failed}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
