"""The W4A16 decode GEMV on the GPU machine (issue 18), in one command of at most 240 s on an
H200 (each stage is a child process with its own time limit; the stages run in order):

  kernels  (<= 90 s)  _w4_gemv_kernel against the torch dequantized reference on llama-8b's
                      shapes (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down
                      14336->4096), bf16 and fp16, symmetric and asymmetric zeros, FMA and
                      tl.dot launches, M = 1, 3, 4, 16, 64 (`CHECK` lines); then the sweep
                      of launch configurations at M = 1, 4, 16 against bf16 (the Triton gemv
                      / cuBLAS) and at M = 64, 256 against the GEMM and dequantize paths,
                      time per call in CUDA graphs and the effective weight stream in TB/s
                      (`SWEEP` lines); the best launch per (M bucket, K, N) is written to
                      w4_tuned.json (`TUNED` lines).
  e2e      (<= 95 s) llama-8b dummy W4A16 (compressed-tensors, symmetric, group 128) with
                      the tuned launches: b1_decode, ttft1024, thr512 (quant_gpu.py's
                      timing; `RESULT` lines).
  fixtures (<= 55 s)  quant_gpu.py's fixture check on CUDA (the GPTQ act-order fixture
                      included); FP8 fixtures that differ get the fp32 reference's margins
                      at the divergences and a bf16 GPU reference (`CHECK` lines).

    PYTHONPATH=$PWD python3 benchmarks/w4_gpu.py              all stages (<= 240 s)
    PYTHONPATH=$PWD python3 benchmarks/w4_gpu.py --cpu-smoke  the same code on CPU, tiny
                                                             shapes (Triton interpreter)
    python3 benchmarks/w4_gpu.py STAGE [--cpu-smoke]          one stage in this process

Raw output goes to $OUT/w4_gpu.txt as well when OUT is set.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks.quant_gpu import FAILED, _rel, _report, check_fixtures, emit, run_timing  # noqa: E402

STAGES = {"kernels": 90, "e2e": 95, "fixtures": 55}
TUNED_FILE = os.path.join(os.environ.get("OUT") or "/tmp", "w4_tuned.json")
DEVICE = "cpu" if SMOKE else "cuda"
SHAPES = ([("qkv", 256, 384), ("down", 384, 256)] if SMOKE else
          [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)])


def _weights(k: int, n: int, dtype: torch.dtype, symmetric: bool, seed: int = 0):
    from pagedserve.layers.quantization.int4 import pack_int32
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    qweight = pack_int32(torch.randint(0, 16, (k, n), device=DEVICE, generator=g), 0)
    scales = (torch.rand(k // 128, n, device=DEVICE, generator=g) * 2e-3 + 1e-4).to(dtype)
    zeros = (torch.full((k // 128, n), 8, device=DEVICE) if symmetric else
             torch.randint(0, 16, (k // 128, n), device=DEVICE, generator=g)).to(dtype)
    return qweight, scales, zeros


def _configs(m: int):
    from pagedserve.layers.quantization.triton_w4a16 import GemvConfig
    if SMOKE:
        return [GemvConfig(block_n=64), GemvConfig(block_n=64, dot=True)]
    fma = [GemvConfig(block_n=bn, num_warps=w, programs_per_sm=p, num_stages=st)
           for bn, w, p, st in ((128, 4, 4, 3), (128, 4, 8, 3), (256, 4, 4, 3), (256, 8, 4, 3), (256, 4, 8, 4),
                                (512, 4, 4, 3), (512, 8, 4, 3), (64, 4, 8, 3), (128, 4, 2, 3), (128, 4, 4, 5))]
    dot = [GemvConfig(block_n=bn, num_warps=w, programs_per_sm=p, dot=True)
           for bn, w, p in ((64, 4, 4), (128, 4, 4), (64, 4, 8), (128, 8, 4), (32, 4, 8))]
    if m > 16:
        return [GemvConfig(block_n=bn, num_warps=w, block_m=bm, dot=True, programs_per_sm=1)
                for bn, w, bm in ((64, 4, 32), (128, 4, 32), (128, 8, 64), (64, 4, 64), (128, 4, 64))]
    return fma + dot if m == 1 else fma[:4] + dot if m <= 4 else dot


def check_kernels() -> None:
    from pagedserve.layers.quantization.int4 import dequantize_int4
    from pagedserve.layers.quantization.triton_w4a16 import GemvConfig, w4a16_gemv
    launches = [GemvConfig(), GemvConfig(block_n=64, dot=True), GemvConfig(block_n=256, programs_per_sm=1),
                GemvConfig(block_n=128, block_m=64, dot=True, num_warps=8)]
    for name, k, n in SHAPES:
        for dtype in (torch.bfloat16, torch.float16):
            for symmetric in (True, False):
                qweight, scales, zeros = _weights(k, n, dtype, symmetric)
                weight = dequantize_int4(qweight, scales, zeros, 128, None, dtype).float()
                for m in (1, 3, 4, 16, 64):
                    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
                    ref = x.float() @ weight
                    for config in launches:
                        if SMOKE and config.dot and dtype == torch.bfloat16:
                            continue   # the Triton interpreter's bf16 tl.dot returns garbage
                        out = w4a16_gemv(x, qweight, scales, zeros, 128, config)
                        _report(f"w4 gemv {name} m={m} {str(dtype)[6:]} sym={symmetric} dot={config.dot} "
                                f"bn={config.block_n}", _rel(out, ref), 1e-2)
                    if SMOKE:
                        break


def _timer(fn, iters: int = 50) -> float:
    """ms per call: CUDA graphs of 10 calls replayed (on CPU: one call, for the smoke run)."""
    fn()
    if SMOKE:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(iters // 10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (iters // 10 * 10)


def sweep() -> None:
    """Every launch of _configs(m) per M (decode sizes first) and shape; the fastest per
    (bucket, K, N) is kept, and w4_tuned.json rewritten after each, so that a stage cut short
    by its time limit still leaves what it measured."""
    from pagedserve.layers.linear_ops import linear
    from pagedserve.layers.quantization.triton_w4a16 import rows_bucket, w4a16_gemv, w4a16_matmul
    best: dict[str, dict] = {}
    weights = {name: _weights(k, n, torch.bfloat16, True) + (torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16),)
               for name, k, n in SHAPES}
    for m in ((1, 4, 64) if SMOKE else (1, 4, 16, 64, 256)):
        for name, k, n in SHAPES:
            qweight, scales, zeros, dense = weights[name]
            w4_bytes = k * n // 2 + 2 * scales.numel() * scales.element_size()
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            bf16_ms = _timer(lambda: linear(x, dense))
            cublas_ms = _timer(lambda: torch.nn.functional.linear(x, dense))
            key = f"{rows_bucket(m)},{k},{n}"
            if m > 16:   # the paths these rows take without TUNED: the new launch must beat them
                for path in ("gemm", "dequant"):
                    ms = _timer(lambda: w4a16_matmul(x, qweight, scales, zeros, 128, None, path))
                    emit("SWEEP", layer=name, m=m, k=k, n=n, path=path, w4_us=round(ms * 1e3, 1),
                         cublas_bf16_us=round(cublas_ms * 1e3, 1))
                    if key not in best or ms < best[key]["ms"]:
                        best[key] = dict(ms=ms, config=None, path=path)
            for config in _configs(m):
                try:
                    ms = _timer(lambda: w4a16_gemv(x, qweight, scales, zeros, 128, config))
                except Exception as exc:   # a launch that does not compile is reported, not fatal
                    emit("SWEEP", layer=name, m=m, config=config.__dict__, error=f"{type(exc).__name__}: {exc}"[:300])
                    continue
                emit("SWEEP", layer=name, m=m, k=k, n=n, config=config.__dict__, w4_us=round(ms * 1e3, 1),
                     bf16_us=round(bf16_ms * 1e3, 1), cublas_bf16_us=round(cublas_ms * 1e3, 1),
                     vs_bf16=round(bf16_ms / ms, 2), w4_tb_s=round(w4_bytes / ms / 1e9, 2),
                     bf16_tb_s=round(k * n * 2 / bf16_ms / 1e9, 2))
                if key not in best or ms < best[key]["ms"]:
                    best[key] = dict(ms=ms, config=config.__dict__, path="w4_gemv")
            emit("TUNED", key=key, us=round(best[key]["ms"] * 1e3, 1), path=best[key]["path"],
                 config=best[key]["config"])
            with open(TUNED_FILE, "w") as f:
                json.dump({key: value["config"] for key, value in best.items() if value["config"]}, f)


def load_tuned() -> None:
    from pagedserve.layers.quantization import triton_w4a16
    if not os.path.exists(TUNED_FILE):
        emit("TUNED", note=f"no {TUNED_FILE}: default launches")
        return
    with open(TUNED_FILE) as f:
        for key, config in json.load(f).items():
            bucket, k, n = (int(v) for v in key.split(","))
            triton_w4a16.TUNED[(bucket, k, n)] = triton_w4a16.GemvConfig(**config)
    emit("TUNED", loaded=len(triton_w4a16.TUNED))


def e2e() -> None:
    load_tuned()
    if SMOKE:
        shape = dict(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=False)
        run_timing("w4a16", 1, shape=shape, decode_tokens=8, device="cpu", max_model_len=1100,
                   max_num_seqs=4)
    else:
        run_timing("w4a16", 512)


def fixtures() -> None:
    """The fixtures this run is for first (GPTQ act-order, the FP8 ones), then the rest."""
    first = ["gptq-asym-actorder", "ct-fp8-dynamic", "ct-fp8-static", "ct-fp8-block", "fp8-block"]
    if SMOKE:
        first = ["gptq-asym-actorder", "ct-fp8-dynamic"]
    rest = [] if SMOKE else sorted(set(os.listdir(os.path.join(REPO, "tests", "fixtures", "quant"))) - set(first))
    check_fixtures(DEVICE, only=first + rest)


def run_stage(stage: str) -> None:
    if stage == "kernels":
        check_kernels()
        sweep()
    elif stage == "e2e":
        e2e()
    else:
        fixtures()
    print(f"STAGE_SUMMARY {stage} failed={len(FAILED)} {FAILED[:20]}", flush=True)
    sys.exit(1 if FAILED else 0)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--cpu-smoke"]
    if args:
        if args[0] not in STAGES:
            sys.exit(__doc__)
        run_stage(args[0])
        return
    log = open(os.path.join(os.environ["OUT"], "w4_gpu.txt"), "w") if os.environ.get("OUT") else None
    if os.path.exists(TUNED_FILE):
        os.remove(TUNED_FILE)
    for stage, limit in STAGES.items():
        start = time.time()
        cmd = [sys.executable, os.path.abspath(__file__), stage] + (["--cpu-smoke"] if SMOKE else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        try:
            out, _ = proc.communicate(timeout=limit * (20 if SMOKE else 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += f"\nSTAGE {stage} TIMED OUT after {limit} s\n"
        text = out + f"STAGE {stage} exit={proc.returncode} wall_s={time.time() - start:.1f}\n"
        print(text, end="", flush=True)
        if log:
            log.write(text)
            log.flush()


if __name__ == "__main__":
    main()
