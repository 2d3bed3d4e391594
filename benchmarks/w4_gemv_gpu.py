"""The one-row W4A16 GEMV on the GPU machine (issue 18, session 10): gate_up's SiLU-and-mul
epilogue (its columns interleaved at load: int4.interleave_gate_up) and x handed to down in
the loop's form (prescale_x: fp32 scaled per nibble, sums per 64 rows), against main's default
(SiLU in down's prologue), llama-8b b1_decode with each, in one device call (<= 240 s). Stages,
each a child process with its own time limit:

  e2e_default (<= 45 s) llama-8b dummy W4A16 (compressed-tensors, symmetric, group 128, LM head
                       bf16), main's path (int4.INTERLEAVE_GATE_UP off): b1_decode, the one-row
                       graph's replay time, the linears' us per projection in an eager step,
                       the greedy ids of one prompt (`IDS`).
  e2e_bf16  (<= 30 s)  bf16 b1_decode, for the ratio.
  e2e_new   (<= 40 s)  W4A16, this branch's default: gate_up's epilogue + prescaled x for down.
  e2e_pairs (<= 40 s)  W4A16, the epilogue only (int4.PRESCALE_X off): down reads plain bf16 x.
  gemv1     (<= 75 s)  exactness first (`CHECK` lines; any failure fails the run): every launch
                       below at one row against the torch dequantized reference, the epilogue
                       (interleaved weights) against SiluAndMul of the plain layout, its prescaled
                       copy against prescale_x, gate_up -> down chained both ways (old: SiLU
                       prologue; new: epilogue + XF32) against the torch MLP. Then the sweep
                       (`SWEEP`: us per call in CUDA graphs, each call on its own copy of the
                       weights, 4x L2 in all): per projection the default launch in each mode
                       (gate_up: norm prologue, + epilogue, + prescaled copy; down: SiLU
                       prologue, plain bf16 x, prescaled x; o: plain, prescaled: what o would
                       save if attention wrote its output prescaled) and a few other launches
                       of the prescaled modes (their instruction mix changed); `FLOOR`.

    bash benchmarks/w4_gemv_gpu.sh                        (the device call)
    PYTHONPATH=$PWD python3 benchmarks/w4_gemv_gpu.py --cpu-smoke   the same code on CPU (interpreter)
    python3 benchmarks/w4_gemv_gpu.py STAGE [--cpu-smoke]           one stage in this process
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks import w4_gpu  # noqa: E402
from benchmarks.quant_gpu import FAILED, _rel, _report, emit, run_timing  # noqa: E402
from benchmarks.w4_gpu import DEVICE, LAYERS, SHAPES, _copies, _name, _timer, _weights  # noqa: E402
from pagedserve.layers.quantization import int4  # noqa: E402
from pagedserve.layers.quantization import triton_w4a16_gemv as t  # noqa: E402
from pagedserve.layers.quantization.triton_w4a16_gemv import GemvConfig  # noqa: E402

STAGES = {"e2e_default": 45, "e2e_bf16": 30, "e2e_new": 40, "e2e_pairs": 40, "gemv1": 75}
G = GemvConfig
PAIRS = int4.PAIRS
DTYPE = torch.float16 if SMOKE else torch.bfloat16
# (projection, mode) -> launches; the first is the default (TUNED's on the GPU)
if SMOKE:
    DEFAULT = {"qkv": G(block_n=128, words=8, atomic=True), "down": G(block_n=128, words=8, atomic=True, prefetch=True)}
    OTHER = {"down": [G(block_n=128, words=8, prefetch=True)]}
else:
    DEFAULT = {name: t.TUNED[(1, k, n)] for name, k, n in SHAPES}
    PF = dict(words=8, atomic=True, prefetch=True, evict=True)
    OTHER = {"o": [G(block_n=128, num_warps=1, programs_per_sm=8, **PF), G(block_n=256, num_warps=1, programs_per_sm=8, **PF),
                   G(block_n=512, num_warps=2, programs_per_sm=8, **PF)],
             "down": [G(block_n=128, num_warps=1, programs_per_sm=8, **PF), G(block_n=256, num_warps=1, **PF),
                      G(block_n=256, num_warps=2, programs_per_sm=6, **PF), G(block_n=512, num_warps=2, **PF)]}
MODES = {"qkv": ["norm"], "o": ["plain", "xf32"], "gate_up": ["norm", "pairs", "pairs_xout"],
         "down": ["silu", "plain", "xf32"]}
if SMOKE:   # the smoke shapes: qkv stands for gate_up too (its N holds whole runs of 2 x 64)
    MODES = {"qkv": ["norm", "pairs", "pairs_xout"], "down": ["silu", "plain", "xf32"]}


def _launches(name: str, mode: str) -> list[GemvConfig]:
    return [DEFAULT[name]] + (OTHER.get(name, []) if mode == "xf32" else [])


def _call(mode: str, x: torch.Tensor, w4: list, config: GemvConfig):
    """fn(i): one row through copy i of the weights in `mode` (what the decode step runs)."""
    k = x.shape[1]
    if mode == "silu":
        gate_up = torch.randn(1, 2 * k, device=DEVICE, dtype=x.dtype)
        return lambda i: t.w4a16_gemv(gate_up[:, :k], *w4[i], 128, config, prologue=t.SILU_AND_MUL)
    if mode in ("norm", "pairs", "pairs_xout"):
        residual, h = torch.randn_like(x), torch.empty_like(x)
        norm = (torch.rand(k, device=DEVICE, dtype=x.dtype) + 0.5, 1e-5, residual, h)
        n = w4[0][0].shape[1]
        xout = (torch.empty(1, n // 2, device=DEVICE), torch.empty(1, n // 128, device=DEVICE)) if mode == "pairs_xout" else None
        pairs = 0 if mode == "norm" else PAIRS
        return lambda i: t.w4a16_gemv(x, *w4[i], 128, config, prologue=t.RMS_NORM_RESIDUAL, norm=norm, pairs=pairs,
                                      xout=xout)
    if mode == "xf32":
        xs, sums = t.prescale_x(x)
        return lambda i: t.w4a16_gemv(xs, *w4[i], 128, config, xsums=sums)
    return lambda i: t.w4a16_gemv(x, *w4[i], 128, config)


def _check_one(name: str, mode: str, config: GemvConfig, plain: tuple, weight: torch.Tensor) -> None:
    """One launch in one mode against the torch reference (fp32 from the dequantized weight)."""
    from pagedserve.layers.norm import RMSNorm
    k = weight.shape[0]
    label = f"{name} {mode} {_name(config)}"
    x = torch.randn(1, k, device=DEVICE, dtype=DTYPE)
    try:
        if mode in ("plain", "xf32"):
            out = _call(mode, x, [plain], config)(0)
            ref = x.float() @ weight
        elif mode == "silu":
            gate_up = torch.randn(1, 2 * k, device=DEVICE, dtype=DTYPE)
            out = t.w4a16_gemv(gate_up[:, :k], *plain, 128, config, prologue=t.SILU_AND_MUL)
            ref = int4.silu_and_mul_pairs(gate_up, k).float() @ weight   # runs of k: [gate | up]
        else:
            residual, h = torch.randn_like(x), torch.empty_like(x)
            norm = RMSNorm(k, 1e-5, DTYPE).to(DEVICE)
            norm.weight.data = torch.rand(k, device=DEVICE, dtype=DTYPE) + 0.5
            normed, _ = norm(x, residual.clone())
            ref = normed.float() @ weight
            if mode == "norm":
                out = t.w4a16_gemv(x, *plain, 128, config, prologue=t.RMS_NORM_RESIDUAL,
                                   norm=(norm.weight, 1e-5, residual, h))
            else:
                n = weight.shape[1]
                mixed = [int4.interleave_gate_up(p, PAIRS) for p in plain]
                xout = (torch.full((1, n // 2), float("nan"), device=DEVICE),
                        torch.full((1, n // 128), float("nan"), device=DEVICE)) if mode == "pairs_xout" else None
                out = t.w4a16_gemv(x, *mixed, 128, config, prologue=t.RMS_NORM_RESIDUAL,
                                   norm=(norm.weight, 1e-5, residual, h), pairs=PAIRS, xout=xout)
                ref = int4.silu_and_mul_pairs(int4.interleave_gate_up(ref, PAIRS), PAIRS)
                if xout is not None:
                    for part, want in zip(xout, t.prescale_x(out)):
                        _report(f"w4 xout {label}", _rel(part, want), 1e-5)
        _report(f"w4 {label}", _rel(out, ref), 1e-2)
    except Exception as exc:   # a launch that does not compile fails the run, loudly
        _report(f"w4 {label}", float("inf"), 1e-2, error=f"{type(exc).__name__}: {exc}"[:300])


def check_mlp() -> None:
    """gate_up -> down for one row, both ways, against the torch MLP (norm, matmul, SiLU-and-mul, matmul)."""
    from pagedserve.layers.norm import RMSNorm
    k, n, kd, nd = (256, 768, 384, 256) if SMOKE else (4096, 28672, 14336, 4096)
    gate_up_w, down_w = _weights(k, n, DTYPE, True, 1), _weights(kd, nd, DTYPE, True, 2)
    gate_up_name = "qkv" if SMOKE else "gate_up"
    x, residual = torch.randn(1, k, device=DEVICE, dtype=DTYPE), torch.randn(1, k, device=DEVICE, dtype=DTYPE)
    weight = torch.rand(k, device=DEVICE, dtype=DTYPE) + 0.5
    norm = RMSNorm(k, 1e-5, DTYPE).to(DEVICE)
    norm.weight.data = weight
    from pagedserve.layers.quantization.int4 import dequantize_int4
    normed, _ = norm(x, residual.clone())
    act = int4.silu_and_mul_pairs((normed.float() @ dequantize_int4(*gate_up_w, 128, None, torch.float32)).to(DTYPE), n // 2)
    ref = act.float() @ dequantize_int4(*down_w, 128, None, torch.float32)
    if SMOKE:   # the smoke's launches stand in for the tuned ones
        for shape, name in (((1, k, n), "qkv"), ((1, kd, nd), "down")):
            t.TUNED[shape] = DEFAULT[name]
    old_gu, _ = t.w4a16_rms_norm_gemv(x, residual.clone(), weight, 1e-5, *gate_up_w, 128, None)
    old = t.w4a16_gemv(old_gu[:, :n // 2], *down_w, 128, DEFAULT["down"], prologue=t.SILU_AND_MUL)
    mixed = [int4.interleave_gate_up(p, PAIRS) for p in gate_up_w]
    xout = (torch.empty(1, n // 2, device=DEVICE), torch.empty(1, n // 128, device=DEVICE))
    act_new, _ = t.w4a16_rms_norm_gemv(x, residual.clone(), weight, 1e-5, *mixed, 128, None, pairs=PAIRS, xout=xout)
    new = t.w4a16_prescaled_gemv(*xout, *down_w, 128, None)
    _report(f"mlp old ({gate_up_name} norm -> down silu)", _rel(old, ref), 1e-2)
    _report(f"mlp new ({gate_up_name} epilogue -> down xf32)", _rel(new, ref), 1e-2)
    _report("mlp new vs old activation", _rel(act_new, act.float()), 1e-2)


def check_launches() -> None:
    for name, k, n in SHAPES:
        if name not in MODES:
            continue
        plain = _weights(k, n, DTYPE, True)
        weight = int4.dequantize_int4(*plain, 128, None, DTYPE).float()
        for mode in MODES[name]:
            for config in _launches(name, mode):
                _check_one(name, mode, config, plain, weight)
    check_mlp()
    dirty = sum(int(torch.count_nonzero(s)) for s in list(t._ZERO_SUMS.values()) + list(t._TILE_COUNTERS.values()))
    _report("scratch left zero", float(dirty), 0.0)


def sweep() -> None:
    """Every launch and mode at one row on rotated copies of the weights; FLOOR: a layer's linears."""
    default_us, best_us = {}, {}
    for name, k, n in SHAPES:
        if name not in MODES:
            continue
        w4 = [_weights(k, n, DTYPE, True, seed) for seed in range(_copies(k * n // 2))]
        x = torch.randn(1, k, device=DEVICE, dtype=DTYPE)
        for mode in MODES[name]:
            for config in _launches(name, mode):
                if any(f.startswith(f"w4 {name} {mode} {_name(config)}") for f in FAILED):
                    continue
                try:
                    us = _timer(_call(mode, x, w4, config), len(w4)) * 1e3
                except Exception as exc:
                    _report(f"sweep {name} {mode} {_name(config)}", float("inf"), 0.0, error=f"{type(exc).__name__}: {exc}"[:300])
                    continue
                emit("SWEEP", layer=name, mode=mode, us=round(us, 2), default=config == DEFAULT[name], launch=_name(config))
                if config == DEFAULT[name]:
                    default_us[(name, mode)] = us
                best_us[(name, mode)] = min(us, best_us.get((name, mode), float("inf")))
    old = sum(default_us.get((name, mode), 0.0) for name, mode in (("qkv", "norm"), ("o", "plain"), ("gate_up", "norm"),
                                                                     ("down", "silu")))
    new = sum(default_us.get((name, mode), 0.0) for name, mode in (("qkv", "norm"), ("o", "plain"),
                                                                     ("gate_up", "pairs_xout"), ("down", "xf32")))
    emit("FLOOR", old_layer_us=round(old, 2), new_layer_us=round(new, 2), step_saved_ms=round(LAYERS * (old - new) / 1e3, 3),
         best={f"{a} {b}": round(us, 2) for (a, b), us in best_us.items()},
         note="default launches: qkv + o + gate_up + down a layer, old (norm, plain, norm, silu) vs new "
              "(norm, plain, epilogue + xout, xf32)")


def e2e(stage: str) -> None:
    variant = "bf16" if stage == "e2e_bf16" else "w4a16"
    int4.INTERLEAVE_GATE_UP = stage in ("e2e_new", "e2e_pairs")
    int4.PRESCALE_X = stage == "e2e_new"
    emit("SWITCHES", stage=stage, interleave_gate_up=int4.INTERLEAVE_GATE_UP, prescale_x=int4.PRESCALE_X)
    if SMOKE:
        shape = dict(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=False)
        llm = run_timing(variant, 2, shape=shape, decode_tokens=8, device="cpu", max_model_len=1100, max_num_seqs=4,
                         workloads=("b1_decode",))
    else:
        llm = run_timing(variant, 512, workloads=("b1_decode",))
    from pagedserve import SamplingParams
    out = llm.generate([{"prompt_token_ids": list(range(300, 340))}],
                       SamplingParams(max_tokens=8 if SMOKE else 32, temperature=0.0, ignore_eos=True), use_tqdm=False)
    emit("IDS", stage=stage, ids=list(out[0].outputs[0].token_ids))
    if SMOKE:
        return
    try:
        w4_gpu.decode_profile(f"{variant}_{stage}", llm)
    except Exception as exc:   # the figures above stand without it
        emit("PROFILE", variant=variant, error=f"{type(exc).__name__}: {exc}"[:300])


def warm(workers: int = 8, limit_s: float = 40.0) -> None:
    """Compile the checks' launches in `workers` processes at once (each runs every workers-th
    projection-mode's checks, output dropped): Triton's on-disk cache then serves the checks and the sweep."""
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
        check_launches()
        print(f"CHECK_SUMMARY failed={len(FAILED)} {FAILED[:20]}", flush=True)
        sweep()
    else:
        e2e(stage)
    print(f"STAGE_SUMMARY {stage} failed={len(FAILED)} {FAILED[:20]}", flush=True)
    sys.exit(1 if FAILED else 0)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--cpu-smoke"]
    if args and args[0] in STAGES:
        run_stage(args[0])
        return
    if len(args) == 3 and args[0] == "warm":   # one of warm()'s workers: every n-th (projection, mode)
        index, workers = int(args[1]), int(args[2])
        jobs = [(name, k, n, mode) for name, k, n in SHAPES if name in MODES for mode in MODES[name]]
        for name, k, n, mode in jobs[index::workers]:
            plain = _weights(k, n, DTYPE, True)
            weight = int4.dequantize_int4(*plain, 128, None, DTYPE).float()
            for config in _launches(name, mode):
                _check_one(name, mode, config, plain, weight)
        if index == 0:
            check_mlp()
        return
    if args:
        sys.exit(__doc__)
    log = open(os.path.join(os.environ["OUT"], "w4_gemv_gpu.txt"), "w") if os.environ.get("OUT") else None
    failed = w4_gpu.run_stages(os.path.abspath(__file__), STAGES, log)
    lines = [line for line in open(log.name)] if log else []
    summary = [line.strip()[:600] for line in lines if line.startswith(("FLOOR", "RESULT", "CHECK_SUMMARY", "STAGE ", "IDS"))
               or "linear_us_in_step" in line or "graph_replay" in line or (line.startswith("SWEEP") and '"default": true' in line)]
    print("==== SUMMARY\n" + "\n".join(summary) + f"\nFAILED_STAGES {failed}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
