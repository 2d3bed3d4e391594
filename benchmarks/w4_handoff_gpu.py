"""The one-row W4A16 hand-offs (issue 18, session 11; layers/quantization/w4a16_handoff.py) on the
GPU machine, in one device call (<= 420 s): llama-8b b1_decode with the hand-offs, with every
launch rounding its output (main before), with qkv's hand-off too, bf16 for the ratio, then the
hand-offs again (the spread), then the checks and the per-launch cost of the fix-up. Each stage
a child process:

  e2e_handoff    (<= 45 s, compiles cold) W4A16 (compressed-tensors, symmetric, group 128, LM
                 head bf16), hand-offs on (the default): b1_decode, the one-row graph's replay,
                 the linears' us per projection in an eager step (benchmarks/w4_gpu.py's profile)
  e2e_rounded    (<= 30 s) the same with w4a16_handoff.ENABLED = False
  e2e_qkv        (<= 40 s) hand-offs with qkv's too (w4a16_handoff.QKV: into rotary + KV store)
  e2e_bf16       (<= 30 s) bf16 b1_decode
  e2e_handoff2   (<= 30 s) the first stage again
  check          (<= 200 s) llama-8b's o -> gate_up -> down at one row with the tuned launches:
                 handed on vs rounded vs x.float() @ the dequantized weights (`CHECK`; the residual
                 bit for bit); the same launches (and qkv's, not handed on in the model yet) timed in
                 CUDA graphs on rotated weight copies (4x L2), rounded vs handed on (`LAUNCH` us: what
                 the fix-up costs a launch); then
                 pytest of the hand-off tests natively (the chain kernels, rotary + KV store of an
                 unnormed hand-off, the tiny model in CUDA graphs with and without qkv's hand-off:
                 ids equal, logprobs within 1e-4).

    bash benchmarks/w4_gemv_gpu.sh w4_handoff_gpu                       (the device call)
    PYTHONPATH=$PWD python3 benchmarks/w4_handoff_gpu.py --cpu-smoke    the same code on CPU
"""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks import w4_gpu  # noqa: E402
from benchmarks.quant_gpu import FAILED, _rel, _report, emit  # noqa: E402
from benchmarks.w4_gpu import DEVICE, _copies, _timer, _weights  # noqa: E402
from pagedserve.layers.quantization import int4, triton_w4a16_gemv as t, w4a16_handoff  # noqa: E402

STAGES = {"e2e_handoff": 45, "e2e_rounded": 30, "e2e_qkv": 40, "e2e_bf16": 30, "e2e_handoff2": 30, "check": 200}
HIDDEN, INTER = (256, 384) if SMOKE else (4096, 14336)


def e2e(stage: str) -> None:
    variant = "bf16" if stage == "e2e_bf16" else "w4a16"
    w4a16_handoff.ENABLED = stage != "e2e_rounded"
    w4a16_handoff.QKV = stage == "e2e_qkv"
    label = stage.removeprefix("e2e_")
    int4.ONE_ROW_GEMV_ON_CPU = SMOKE   # the smoke's CPU model through the FMA GEMV (interpreter)
    llm = w4_gpu.timed_engine(variant, ("b1_decode",))
    if llm is None:
        return
    model = llm.engine.core.executor.runner.model.model
    emit("HANDOFF", stage=label, planned_layers=sum(getattr(layer.self_attn.o_proj, "w4a16_handoff", None) is not None
                                                    for layer in model.own_layers),
         qkv_layers=sum(getattr(layer.self_attn.qkv_proj, "w4a16_handoff", None) is not None for layer in model.own_layers))
    w4_gpu.try_decode_profile(label, llm)


def _chain(ws: list, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, buffers):
    """o -> gate_up (RMSNorm + residual) -> down (SiLU) at one row; `buffers` None: each launch
    rounds its output; else the three hand-offs. Returns (o out, residual out, gate_up normed, down out)."""
    o, gate_up, down = ws
    if buffers is None:
        h1 = t.w4a16_gemv(x, *o, 128)
        gu, res = t.w4a16_rms_norm_gemv(h1, residual, norm_weight, 1e-5, *gate_up, 128, None)
        return h1, res, gu, t.w4a16_silu_and_mul_gemv(gu, *down, 128, None)
    h1 = t.w4a16_gemv(x, *o, 128, handoff=buffers[0])
    gu, res = t.w4a16_rms_norm_gemv(h1, residual, norm_weight, 1e-5, *gate_up, 128, None, handoff=buffers[1])
    squares, inv_k, eps = gu.w4a16_unnormed
    normed = gu * torch.rsqrt(squares * inv_k + eps)[:, None]
    return h1, res, normed, t.w4a16_silu_and_mul_gemv(gu, *down, 128, None, handoff=buffers[2])


def check() -> None:
    from pagedserve.layers.activation import SiluAndMul
    from pagedserve.layers.quantization.int4 import dequantize_int4
    torch.manual_seed(0)
    dtype = torch.float16 if SMOKE else torch.bfloat16
    shapes = {"o": (HIDDEN, HIDDEN), "gate_up": (HIDDEN, 2 * INTER), "down": (INTER, HIDDEN)}
    ws = [_weights(k, n, dtype, True) for k, n in shapes.values()]
    qkv = (HIDDEN, HIDDEN + HIDDEN // 2)   # llama-8b's 32 + 2 x 8 heads of 128 (not handed on yet: timed only)
    norm_weight = torch.rand(HIDDEN, device=DEVICE, dtype=dtype) + 0.5
    workspace = torch.zeros(HIDDEN + 2 * INTER + 1 + HIDDEN, device=DEVICE)
    buffers = (workspace[:HIDDEN].view(1, -1), workspace[HIDDEN:HIDDEN + 2 * INTER + 1].view(1, -1),
               workspace[-HIDDEN:].view(1, -1))
    for trial in range(3):
        x, residual = (torch.randn(1, HIDDEN, device=DEVICE, dtype=dtype) for _ in range(2))
        rounded = _chain(ws, x, residual, norm_weight, None)
        workspace.zero_()
        handed = _chain(ws, x, residual, norm_weight, buffers)
        h1_ref = x.float() @ dequantize_int4(*ws[0], 128, None, torch.float32)
        _report(f"o handed on vs fp32 reference, trial {trial}", _rel(handed[0], h1_ref), 1e-5)
        _report(f"o rounded vs fp32 reference, trial {trial}", _rel(rounded[0], h1_ref), 1e-2)
        _report(f"residual (rounded once) vs torch, trial {trial}",
                float(not torch.equal(handed[1], (handed[0] + residual.float()).to(dtype))), 0.0)
        for i, what in ((2, "gate_up normed"), (3, "down")):
            _report(f"{what}: handed on vs rounded, trial {trial}", _rel(handed[i], rounded[i]), 1e-2)
        down_ref = SiluAndMul()(handed[2]) @ dequantize_int4(*ws[2], 128, None, torch.float32)
        _report(f"down handed on vs fp32 reference of its input, trial {trial}", _rel(handed[3], down_ref), 1e-5)
    emit("TUNED", launches={name: w4_gpu._name(t.gemv_config(1, *shape)) for name, shape in shapes.items()})
    # per launch, rounded (the fix-up) vs handed on (atomic adds only), each on its own weight copies
    copies = {name: [_weights(k, n, dtype, True, seed) for seed in range(_copies(k * n // 2))]
              for name, (k, n) in {**shapes, "qkv": qkv}.items()}
    qkv_out = torch.zeros(1, qkv[1] + 1, device=DEVICE)
    x, residual = torch.randn(1, HIDDEN, device=DEVICE, dtype=dtype), torch.randn(1, HIDDEN, device=DEVICE, dtype=dtype)
    h = torch.empty_like(x)
    gate_up_in = torch.randn(1, 2 * INTER, device=DEVICE, dtype=dtype)
    handed_gate_up = workspace[HIDDEN:HIDDEN + 2 * INTER].view(1, -1)
    handed_gate_up.w4a16_unnormed = (buffers[1][:, -1], 1.0 / HIDDEN, 1e-5)
    norm = (norm_weight, 1e-5, residual, h)
    runs = {   # qkv: what its fix-up costs, to decide whether rotary + KV store should take a hand-off too
        "qkv": (lambda i: t.w4a16_gemv(x, *copies["qkv"][i], 128, prologue=t.RMS_NORM_RESIDUAL, norm=norm),
                lambda i: t.w4a16_gemv(x, *copies["qkv"][i], 128, prologue=t.RMS_NORM_RESIDUAL, norm=norm,
                                       handoff=qkv_out[:, :-1], handoff_squares=qkv_out[:, -1])),
        "o": (lambda i: t.w4a16_gemv(x, *copies["o"][i], 128),
              lambda i: t.w4a16_gemv(x, *copies["o"][i], 128, handoff=buffers[0])),
        "gate_up": (lambda i: t.w4a16_gemv(x, *copies["gate_up"][i], 128, prologue=t.RMS_NORM_RESIDUAL, norm=norm),
                    lambda i: t.w4a16_gemv(x, *copies["gate_up"][i], 128, prologue=t.RMS_NORM_RESIDUAL, norm=norm,
                                           handoff=buffers[1][:, :-1], handoff_squares=buffers[1][:, -1])),
        "down": (lambda i: t.w4a16_silu_and_mul_gemv(gate_up_in, *copies["down"][i], 128, None),
                 lambda i: t.w4a16_silu_and_mul_gemv(handed_gate_up, *copies["down"][i], 128, None,
                                                     handoff=buffers[2])),
    }
    for round_ in range(2):   # ABAB
        for name, (rounded_fn, handed_fn) in runs.items():
            n = len(copies[name])
            emit("LAUNCH", layer=name, round=round_, rounded_us=round(_timer(rounded_fn, n) * 1e3, 2),
                 handed_us=round(_timer(handed_fn, n) * 1e3, 2))
    if SMOKE:
        return
    tests = ["tests/kernels/test_quant_kernels.py", "tests/kernels/test_store_kv.py", "-k",
             "hand_off or handed_on or rms_norm_prologue or silu_and_mul_prologue or rotary_store_kv",
             "tests/models/test_w4a16_handoff.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=REPO,
                          capture_output=True, text=True, timeout=150)
    print(proc.stdout[-3000:], proc.stderr[-1000:], flush=True)
    emit("PYTEST", rc=proc.returncode, tail=proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else [])
    if proc.returncode:
        FAILED.append("pytest")


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--cpu-smoke"]
    if args and args[0] in STAGES:
        check() if args[0] == "check" else e2e(args[0])
        print(f"STAGE_SUMMARY {args[0]} failed={len(FAILED)} {FAILED[:20]}", flush=True)
        sys.exit(1 if FAILED else 0)
    if args:
        sys.exit(__doc__)
    log = open(os.path.join(os.environ["OUT"], "w4_handoff_gpu.txt"), "w") if os.environ.get("OUT") else None
    failed = w4_gpu.run_stages(os.path.abspath(__file__), STAGES, log)
    lines = list(open(log.name)) if log else []
    summary = [line.strip()[:400] for line in lines if line.startswith(("RESULT", "HANDOFF", "LAUNCH", "TUNED", "PYTEST",
                                                                         "STAGE "))
               or "linear_us_in_step" in line or "graph_replay" in line or '"ok": false' in line]
    print("==== SUMMARY\n" + "\n".join(summary) + f"\nFAILED_STAGES {failed}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
