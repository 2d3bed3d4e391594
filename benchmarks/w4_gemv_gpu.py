"""The one-row W4A16 GEMV on the GPU machine (issue 18, session 8): old launches against new ones,
then llama-8b b1_decode with each, in one device call (<= 240 s). Four stages, each a child
process with its own time limit:

  gemv1     (<= 120 s) exactness first (`CHECK` lines, any failure or launch that does not
                       compile fails the run): every launch below at 1 and 3 rows on llama-8b's
                       shapes (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down
                       14336->4096; bf16, plus asymmetric zeros and (two launches) fp16 on qkv), each
                       with the prologue the decode step folds into it (RMSNorm + residual for
                       qkv / gate_up against RMSNorm then the launch; SiLU-and-mul for down
                       against SiluAndMul then the launch), and the atomic launches' zeroed
                       scratch and counters left zero. Then the sweep (`SWEEP` lines: us per
                       call in CUDA graphs, each call on its own copy of the weights, 4x L2 in
                       all, with the projection's prologue; TB/s of int4 weights + scales):
                       OLD = triton_w4a16.TUNED's static one-row launches (main's default) and
                       the old sweep's list, NEW = the atomic split-K launches (session 8's
                       [words, block_n] accumulator lost everywhere and is gone). `BEST` per
                       shape old / new, `FLOOR` per layer, the
                       best of all to /tmp/w4_gemv_tuned.json (a copy under $OUT).
  e2e_old   (<= 45 s)  llama-8b dummy W4A16 (compressed-tensors, symmetric, group 128, LM head
                       bf16) with the static TUNED (main's default): b1_decode, then the one-row
                       graph's replay time and the linears' us per projection in an eager step.
  e2e_bf16  (<= 30 s)  bf16 b1_decode (main's default path), for the ratio.
  e2e_new   (<= 45 s)  W4A16 with the sweep's best launches, then thr512 (last: the time left).

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
from benchmarks.quant_gpu import FAILED, _rel, _report, emit, run_timing  # noqa: E402
from benchmarks.w4_gpu import DEVICE, LAYERS, PROLOGUES, SHAPES, _copies, _name, _timer, _weights  # noqa: E402
from pagedserve.layers.quantization import triton_w4a16_gemv as t  # noqa: E402
from pagedserve.layers.quantization.triton_w4a16_gemv import GemvConfig  # noqa: E402

STAGES = {"gemv1": 120, "e2e_old": 45, "e2e_bf16": 30, "e2e_new": 45}
TUNED_FILE = "/tmp/w4_gemv_tuned.json"
G = GemvConfig
STATIC = {key[1:]: config for key, config in t.TUNED.items() if key[0] == 1}   # (K, N) -> main's launch
if SMOKE:
    OLD = [G(block_n=32, words=8), G(block_n=32, words=8, fixup=False)]
    NEW = [G(block_n=32, words=8, atomic=True), G(block_n=16, atomic=True)]
else:
    OLD = list(dict.fromkeys(list(STATIC.values()) + [
        G(), G(block_n=256, num_warps=2, words=8, num_stages=1), G(block_n=256, num_warps=2, words=8, fixup=False)]))
    NEW = [
        # split K summed by fp32 atomics: more programs per SM without a longer fix-up
        G(block_n=128, num_warps=1, words=8, atomic=True, programs_per_sm=8),
        G(block_n=128, num_warps=1, words=8, atomic=True, programs_per_sm=16),
        G(block_n=256, num_warps=2, words=8, atomic=True),
        G(block_n=256, num_warps=2, words=8, atomic=True, programs_per_sm=8),
        G(words=8, atomic=True, programs_per_sm=8),
        G(block_n=512, num_warps=2, words=8, atomic=True),          # 8 columns a thread
        G(block_n=512, num_warps=2, words=8, atomic=True, programs_per_sm=8),
    ]


def _scratch_clean(label: str) -> None:
    """The atomic launches leave their zeroed sums and the split-K counters zero."""
    dirty = sum(int(torch.count_nonzero(s)) for s in list(t._ZERO_SUMS.values()) + list(t._TILE_COUNTERS.values()))
    _report(f"{label} scratch left zero", float(dirty), 0.0)


def _fits(name: str, config: GemvConfig) -> bool:
    """A launch the step can run for this projection: its norm prologue sums split K in the
    kernel (fixup), or the step would not fuse the norm (w4a16_rms_norm_gemv returns None)."""
    return config.fixup or PROLOGUES[name] != t.RMS_NORM_RESIDUAL


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


def check_launches() -> set:
    """Every OLD and NEW launch against x.float() @ the dequantized weight (1e-2 relative: the
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
            configs = OLD + NEW if dtype != torch.float16 or SMOKE else NEW[:1] + NEW[-2:-1]   # fp16: fewer compiles
            for config in [c for c in configs if _fits(name, c)]:
                label = f"{name} {str(dtype)[6:]} sym={symmetric} {_name(config)}"
                try:
                    for m in (1, 3):
                        x = torch.randn(m, k, device=DEVICE, dtype=dtype)
                        err = _rel(t.w4a16_gemv(x, *w4, 128, config), x.float() @ weight)
                        _report(f"w4 m={m} {label}", err, 1e-2)
                        bad |= {label} if err > 1e-2 else set()
                    if (dtype, symmetric) == variants[0]:
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
    best, chosen = {}, {}
    totals = {"static": 0.0, "old": 0.0, "new": 0.0, "any": 0.0}
    for name, k, n in SHAPES:
        w4 = [_weights(k, n, torch.bfloat16 if not SMOKE else torch.float16, True, seed)
              for seed in range(_copies(k * n // 2))]
        w4_bytes = k * n // 2 + 2 * w4[0][1].numel() * w4[0][1].element_size()
        x = torch.randn(1, k, device=DEVICE, dtype=w4[0][1].dtype)
        times = {}
        for group, configs in (("old", OLD), ("new", NEW)):
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
        for group in ("old", "new"):
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
        for path in [TUNED_FILE] + ([os.path.join(os.environ["OUT"], "w4_gemv_tuned.json")]
                                    if os.environ.get("OUT") else []):
            with open(path, "w") as f:
                json.dump({"gemv": chosen}, f)
    emit("FLOOR", **{f"{key}_layer_us": round(ms * 1e3, 1) for key, ms in totals.items()},
         step_saved_ms=round(LAYERS * (totals["static"] - totals["any"]), 3),
         note="sum over the 4 projections of the one-row launch (static: main's TUNED); saved: x layers")


def load_tuned() -> None:
    if not os.path.exists(TUNED_FILE):
        FAILED.append(f"no {TUNED_FILE}: the sweep did not run")
        return
    with open(TUNED_FILE) as f:
        for key, config in json.load(f)["gemv"].items():
            t.TUNED[tuple(int(v) for v in key.split(","))] = GemvConfig(**config)
    emit("TUNED", loaded={str(key): _name(c) for key, c in t.TUNED.items() if key[0] == 1})


def e2e(stage: str) -> None:
    variant = "bf16" if stage == "e2e_bf16" else "w4a16"
    if stage == "e2e_new":
        load_tuned()
    workloads = ("b1_decode", "thr") if stage == "e2e_new" else ("b1_decode",)
    if SMOKE:
        shape = dict(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=False)
        run_timing(variant, 2, shape=shape, decode_tokens=8, device="cpu", max_model_len=1100, max_num_seqs=4,
                   workloads=workloads)
        return
    llm = run_timing(variant, 512, workloads=("b1_decode",))
    try:
        w4_gpu.decode_profile(f"{variant}_{stage}", llm)
    except Exception as exc:   # the figures above stand without it
        emit("PROFILE", variant=variant, error=f"{type(exc).__name__}: {exc}"[:300])
    if "thr" in workloads:
        from benchmarks.quant_gpu import _throughput
        _throughput(llm, f"{variant}_{stage}", 512, dict(ignore_eos=True, temperature=0.0, detokenize=False))


def run_stage(stage: str) -> None:
    if stage == "gemv1":
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
    if args:
        sys.exit(__doc__)
    log = open(os.path.join(os.environ["OUT"], "w4_gemv_gpu.txt"), "w") if os.environ.get("OUT") else None
    if os.path.exists(TUNED_FILE):
        os.remove(TUNED_FILE)
    failed = w4_gpu.run_stages(os.path.abspath(__file__), STAGES, log)
    lines = [line for line in open(log.name)] if log else []
    summary = [line.strip()[:400] for line in lines if line.startswith(("BEST", "TUNED", "FLOOR", "RESULT", "CHECK_SUMMARY"))
               or "linear_us_in_step" in line or "graph_replay" in line]
    print("==== SUMMARY\n" + "\n".join(summary) + f"\nFAILED_STAGES {failed}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
