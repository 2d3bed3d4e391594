"""The W4A16 kernels on the GPU machine (issue 18): four stages, each a child process with its
own time limit, run in order; parts a and b (benchmarks/w4_gpu.sh) split them over two device
calls on one warm machine, so that each carries half of the default model for `ppl`:

  kernels   (<= 170 s) exactness first (`CHECK` lines): the one-row FMA GEMV (denormal
                       nibbles; in-kernel split-K fix-up or the sum kernel; 16 or 8 words per
                       K block; its SiLU-and-mul and RMSNorm prologues), the tl.dot GEMV
                       and the one-load-per-word GEMM (scales on the
                       block sums or on the weights) against the torch dequantized reference on
                       llama-8b's shapes (qkv 4096->6144, o 4096->4096, gate_up 4096->28672,
                       down 14336->4096), bf16 (fp16 and asymmetric zeros on some), M = 1..256.
                       Then the launch sweep (`SWEEP` lines: us per call in CUDA graphs, each
                       call on its own copy of the weights, 4x the L2 cache in all, so that they
                       come from HBM as in the model; the int4 weight + scale/zero stream in
                       TB/s, against the bf16 Triton gemv / cuBLAS on rotated copies too), in
                       the order M = 1 (GEMV launches, each projection with the prologue
                       the decode step folds into it), 256, 512, 64 (GEMM
                       launches against dequantize + cuBLAS and the generic GEMM; `DEQUANT`: the
                       two dequantization kernels alone), 4, 16 (GEMV launches and the GEMM with
                       split K); torch's tinygemm on the same weights at 1-64 rows
                       (`TINYGEMM`, a reference); the bf16 LM head at M = 1; `FLOOR`
                       estimates the b1 step's linears. The best launch per (M bucket, K, N) goes to w4_tuned.json
                       (`TUNED`; /tmp/w4_gpu_tuned.json for part b, a copy under $OUT),
                       rewritten as it goes.
  e2e_w4a16 (<= 75 s)  llama-8b dummy W4A16 (compressed-tensors, symmetric, group 128, LM head
                       bf16) with the tuned launches: b1_decode, ttft1024, thr512 (quant_gpu.py's
                       timing; `RESULT` lines); then the one-row CUDA graph replayed alone (the
                       step's GPU time, `PROFILE`), the kernel table of one eager one-row
                       forward (torch.profiler) and its linears' us per projection.
  e2e_bf16  (<= 60 s)  the same for bf16, for the ratios.
  ppl       (<= 150 s) benchmarks/quant_perplexity.py on CUDA in bf16 (every variant).

    bash benchmarks/w4_gpu.sh a, then bash benchmarks/w4_gpu.sh b   (the device calls)
    PYTHONPATH=$PWD python3 benchmarks/w4_gpu.py [a | b]      all stages, or one part
    PYTHONPATH=$PWD python3 benchmarks/w4_gpu.py --cpu-smoke  the same code on CPU, tiny
                                                             shapes (Triton interpreter)
    python3 benchmarks/w4_gpu.py STAGE [--cpu-smoke]          one stage in this process

Raw output goes to $OUT/w4_gpu{a,b,}.txt as well when OUT is set.
"""
from __future__ import annotations

import dataclasses
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

from benchmarks.quant_gpu import FAILED, _rel, _report, emit, run_timing  # noqa: E402
from pagedserve.layers.quantization.triton_w4a16 import GemmConfig  # noqa: E402
from pagedserve.layers.quantization.triton_w4a16_gemv import SILU_AND_MUL, GemvConfig  # noqa: E402

STAGES = {"kernels": 170, "e2e_w4a16": 75, "e2e_bf16": 60, "ppl": 150}
TUNED_FILE = "/tmp/w4_gpu_tuned.json"   # kept between part a and part b on one machine; a copy under $OUT
DEVICE = "cpu" if SMOKE else "cuda"
SHAPES = ([("qkv", 256, 384), ("down", 384, 256)] if SMOKE else
          [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)])
LAYERS = 2 if SMOKE else 32
# the x prologue the decode step folds into each projection's one-row GEMV (models/llama.py
# through LinearMethod.apply_normed / apply_silu_and_mul): 3 RMSNorm + residual, 1 SiLU-and-mul
PROLOGUES = {"qkv": 3, "o": 0, "gate_up": 3, "down": 1}
LM_HEAD = (256, 32064) if SMOKE else (4096, 128256)

# launches: the checks use the first few of each list, the sweep all of them
FMA = ([GemvConfig(block_n=64, num_warps=1), GemvConfig(block_n=32, words=8, fixup=False)] if SMOKE else
       [GemvConfig(), GemvConfig(programs_per_sm=2), GemvConfig(programs_per_sm=8),
        GemvConfig(block_n=256, num_warps=2), GemvConfig(block_n=256, num_warps=2, words=8),
        GemvConfig(words=8), GemvConfig(block_n=1024, num_warps=8), GemvConfig(fixup=False),
        GemvConfig(num_stages=2), GemvConfig(block_n=128, num_warps=1),
        GemvConfig(block_n=128, num_warps=1, words=8), GemvConfig(block_n=256, num_warps=2, words=8, num_stages=1)])
DOT = ([GemvConfig(block_n=32, dot=True)] if SMOKE else
       [GemvConfig(block_n=128, dot=True), GemvConfig(block_n=64, dot=True),
        GemvConfig(block_n=128, num_warps=8, dot=True)])
GEMM = ([GemmConfig(block_m=32, block_n=32), GemmConfig(block_m=32, block_n=32, programs_per_sm=4),
         GemmConfig(block_m=32, block_n=32, scale_w=True)] if SMOKE else
        [GemmConfig(), GemmConfig(128, 128, 8, 3), GemmConfig(64, 64, 4, 4), GemmConfig(128, 64, 4, 4),
         GemmConfig(64, 64, 4, 4, programs_per_sm=2), GemmConfig(128, 128, 8, 3, programs_per_sm=1),
         GemmConfig(64, 128, 4, 3, programs_per_sm=2), GemmConfig(64, 128, 4, 3, scale_w=True),
         GemmConfig(128, 64, 4, 4, scale_w=True), GemmConfig(64, 64, 4, 4, programs_per_sm=2, scale_w=True),
         GemmConfig(128, 128, 8, 4, scale_w=True), GemmConfig(128, 128, 8, 3, scale_w=True)])
# the GEMM with split K for a few rows (16 per program), against the tl.dot GEMV
FEW = ([GemmConfig(block_m=16, block_n=32, programs_per_sm=4)] if SMOKE else
       [GemmConfig(16, 128, 4, 3, 4), GemmConfig(16, 64, 4, 3, 4), GemmConfig(16, 256, 8, 3, 4)])


def _weights(k: int, n: int, dtype: torch.dtype, symmetric: bool, seed: int = 0):
    from pagedserve.layers.quantization.int4 import pack_int32
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    qweight = pack_int32(torch.randint(0, 16, (k, n), device=DEVICE, generator=g), 0)
    scales = (torch.rand(k // 128, n, device=DEVICE, generator=g) * 2e-3 + 1e-4).to(dtype)
    zeros = (torch.full((k // 128, n), 8, device=DEVICE) if symmetric else
             torch.randint(0, 16, (k // 128, n), device=DEVICE, generator=g)).to(dtype)
    return qweight, scales, zeros


def _name(config) -> str:
    return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items())


def check_kernels() -> None:
    """Every kernel against x.float() @ the torch dequantized weight (1e-2 relative: the
    output's own rounding to bf16 is ~3e-3)."""
    from pagedserve.layers.quantization.int4 import dequantize_int4
    from pagedserve.layers.quantization.triton_w4a16 import w4a16_gemm, w4a16_gemv
    dtypes = (torch.float16,) if SMOKE else (torch.bfloat16, torch.float16)   # interpreter: no bf16 dot
    for index, (name, k, n) in enumerate(SHAPES):
        for dtype in dtypes:
            for symmetric in (True, False):
                if (dtype == torch.float16 or not symmetric) and index % 2 and not SMOKE:
                    continue   # fp16 and asymmetric zeros on half the shapes
                qweight, scales, zeros = _weights(k, n, dtype, symmetric)
                weight = dequantize_int4(qweight, scales, zeros, 128, None, dtype).float()
                cases = [(m, c) for m in (1, 3) for c in FMA[:4 if not SMOKE else 2]]
                cases += [(m, c) for m in (4, 16) for c in DOT[:1] + FEW[:1]]
                cases += [(m, c) for m in (64, 100, 256) for c in GEMM[:2] + GEMM[-1:]]
                if dtype == torch.float16 and not SMOKE:   # fewer compilations: one launch per kernel
                    cases = [(1, FMA[0]), (3, FMA[0]), (4, DOT[0]), (16, FEW[0]), (100, GEMM[0])]
                for m, config in cases:
                    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
                    label = f"w4 {name} m={m} {str(dtype)[6:]} sym={symmetric} {type(config).__name__} {_name(config)}"
                    try:
                        if isinstance(config, GemmConfig):
                            out = w4a16_gemm(x, qweight, scales, zeros, 128, config)
                        else:
                            out = w4a16_gemv(x, qweight, scales, zeros, 128, config)
                    except Exception as exc:   # reported (a failed check), the other launches go on
                        _report(label, float("inf"), 1e-2, error=f"{type(exc).__name__}: {exc}"[:300])
                        continue
                    _report(label, _rel(out, x.float() @ weight), 1e-2)
    # the SiLU-and-mul prologue (down_proj at one row) against SiluAndMul then the same launch
    from pagedserve.layers.activation import SiluAndMul
    _, k, n = SHAPES[-1]
    qweight, scales, zeros = _weights(k, n, torch.bfloat16 if not SMOKE else torch.float16, True)
    gate_up = torch.randn(1, 2 * k, device=DEVICE, dtype=scales.dtype)
    for config in FMA[:2]:
        ref = w4a16_gemv(SiluAndMul()(gate_up), qweight, scales, zeros, 128, config)
        out = w4a16_gemv(gate_up[:, :k], qweight, scales, zeros, 128, config, prologue=SILU_AND_MUL)
        _report(f"w4 fma silu prologue {_name(config)}", _rel(out, ref), 1e-6)
    # the RMSNorm prologue (qkv at one row, with and without the residual) against RMSNorm
    # then the same launch (x normalised in fp32 here, rounded twice there: 1e-2)
    from pagedserve.layers.norm import RMSNorm
    from pagedserve.layers.quantization import triton_w4a16_gemv as triton_w4a16
    _, k, n = SHAPES[0]
    qweight, scales, zeros = _weights(k, n, torch.bfloat16 if not SMOKE else torch.float16, True)
    norm = RMSNorm(k, 1e-5, scales.dtype).to(DEVICE)
    norm.weight.data = torch.rand(k, device=DEVICE, dtype=scales.dtype) + 0.5
    x, residual = (torch.randn(1, k, device=DEVICE, dtype=scales.dtype) * 4 for _ in range(2))
    saved = {(1, k, n): triton_w4a16.TUNED[(1, k, n)]} if (1, k, n) in triton_w4a16.TUNED else {}
    for config in [c for c in FMA if c.fixup][:2]:   # split K: summed in the kernel, or not fused
        triton_w4a16.TUNED[(1, k, n)] = config
        for res in (None, residual):
            fused = triton_w4a16.w4a16_rms_norm_gemv(x, res, norm.weight, norm.eps, qweight, scales, zeros, 128, None)
            if fused is None:
                _report(f"w4 fma rms_norm prologue ran {_name(config)}", 1.0, 0.0)
                continue
            out, h = fused
            normed, h_ref = (norm(x), x) if res is None else norm(x, res.clone())
            ref = w4a16_gemv(normed, qweight, scales, zeros, 128, config)
            _report(f"w4 fma rms_norm prologue residual={res is not None} {_name(config)}", _rel(out, ref), 1e-2,
                    h_equal=bool(torch.equal(h, h_ref)))
            if not torch.equal(h, h_ref):
                FAILED.append("w4 fma rms_norm prologue: x + residual")
    triton_w4a16.TUNED.pop((1, k, n))
    triton_w4a16.TUNED.update(saved)
    # split-K's in-kernel fix-up resets its counters: the same call twice gives the same bits
    qweight, scales, zeros = _weights(4096 if not SMOKE else 256, 512, torch.float16, True)
    x = torch.randn(1, qweight.shape[0] * 8, device=DEVICE, dtype=torch.float16)
    first = w4a16_gemv(x, qweight, scales, zeros, 128, FMA[0])
    _report("w4 fma fix-up repeatable", float((w4a16_gemv(x, qweight, scales, zeros, 128, FMA[0]) != first).sum()), 0.5)


def _with_prologue(name: str, x: torch.Tensor, w4: list, config: GemvConfig):
    """fn(i): the one-row launch of `config` on copy i with the prologue the model folds into
    this projection (SiLU-and-mul on [gate | up] for down, RMSNorm with the residual add for
    qkv and gate_up, none for o), so the sweep pays what the decode step pays."""
    from pagedserve.layers.quantization import triton_w4a16_gemv as t
    k = x.shape[1]
    if PROLOGUES[name] == SILU_AND_MUL:
        gate_up = torch.randn(1, 2 * k, device=DEVICE, dtype=x.dtype)
        return lambda i: t.w4a16_gemv(gate_up[:, :k], *w4[i], 128, config, prologue=SILU_AND_MUL)
    if PROLOGUES[name] == t.RMS_NORM_RESIDUAL:
        residual, h = torch.randn_like(x), torch.empty_like(x)
        norm = (torch.rand(k, device=DEVICE, dtype=x.dtype) + 0.5, 1e-5, residual, h)
        return lambda i: t.w4a16_gemv(x, *w4[i], 128, config, prologue=t.RMS_NORM_RESIDUAL, norm=norm)
    return lambda i: t.w4a16_gemv(x, *w4[i], 128, config)


def _copies(nbytes: int) -> int:
    """How many copies of a weight of `nbytes` to rotate through so that the calls read HBM, as
    a model's layers do (each layer its own weights), not L2: 4x the L2 cache in all."""
    if SMOKE:
        return 2
    return max(2, -(-4 * torch.cuda.get_device_properties(0).L2_cache_size // nbytes))


def _timer(fn, copies: int = 1, iters: int = 50) -> float:
    """ms per call of fn(i), i cycling over `copies` (each its own weights): CUDA graphs of
    max(10, copies) calls replayed (on CPU: one call, for the smoke run)."""
    fn(0)
    if SMOKE:
        start = time.perf_counter()
        fn(1 % copies)
        return (time.perf_counter() - start) * 1e3
    calls = max(10, copies)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % copies)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    replays = max(1, iters // calls)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * calls)


def _save(best: dict) -> None:
    tuned = {"gemv": {}, "gemm": {}, "path": {}}
    for key, value in best.items():
        tuned[value["kind"]][key] = value["config"]
    for path in [TUNED_FILE] + ([os.path.join(os.environ["OUT"], "w4_tuned.json")] if os.environ.get("OUT") else []):
        with open(path, "w") as f:
            json.dump(tuned, f)


def _lm_head_ms() -> float:
    """The bf16 LM head at one row (the W4A16 config leaves it unquantized)."""
    from pagedserve.layers.linear_ops import linear
    head = torch.randn(LM_HEAD[1], LM_HEAD[0], device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(1, LM_HEAD[0], device=DEVICE, dtype=torch.bfloat16)
    ms = _timer(lambda i: linear(x, head))   # 1 GiB: L2 holds none of it
    emit("SWEEP", layer="lm_head_bf16", m=1, k=LM_HEAD[0], n=LM_HEAD[1], bf16_us=round(ms * 1e3, 1),
         bf16_tb_s=round(head.numel() * 2 / ms / 1e9, 2))
    return ms


def sweep() -> None:
    """Every launch per M (decode sizes first) and shape; the fastest per (bucket, K, N) is
    kept, and w4_tuned.json rewritten after each, so that a stage cut short by its time limit
    still leaves what it measured."""
    from pagedserve.layers.linear_ops import linear
    from pagedserve.layers.quantization.triton_w4a16 import (dequantize_w4, rows_bucket, w4a16_gemm, w4a16_gemv,
                                                              w4a16_matmul)
    best: dict[str, dict] = {}
    weights, dense = {}, {}   # copies of each layer's weights (int4; bf16), rotated by the timings
    for name, k, n in SHAPES:
        weights[name] = [_weights(k, n, torch.bfloat16, True, seed) for seed in range(_copies(k * n // 2))]
        dense[name] = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) for _ in range(_copies(k * n * 2))]
    emit("SWEEP_COPIES", **{name: [len(weights[name]), len(dense[name])] for name, _, _ in SHAPES})
    tinygemm: dict[str, list] = {}
    head_ms = _lm_head_ms()
    for m in ((1, 4, 256) if SMOKE else (1, 256, 512, 64, 4, 16)):   # b1's and thr512's rows first
        for name, k, n in SHAPES:
            w4, bf = weights[name], dense[name]
            w4_bytes = k * n // 2 + 2 * w4[0][1].numel() * w4[0][1].element_size()
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            bf16_ms = _timer(lambda i: linear(x, bf[i]), len(bf))
            cublas_ms = _timer(lambda i: torch.nn.functional.linear(x, bf[i]), len(bf))
            key = f"{rows_bucket(m)},{k},{n}"
            common = dict(layer=name, m=m, k=k, n=n, bf16_us=round(bf16_ms * 1e3, 1), cublas_bf16_us=round(cublas_ms * 1e3, 1),
                          bf16_tb_s=round(k * n * 2 / bf16_ms / 1e9, 2))
            if m == 256:   # the dequantize + cuBLAS path's first half, both kernels (int4 read, 16-bit write)
                for generic in (False, True):
                    ms = _timer(lambda i, g=generic: dequantize_w4(*w4[i], 128, None, torch.bfloat16, g), len(w4))
                    emit("DEQUANT", layer=name, kernel="generic" if generic else "blocks", us=round(ms * 1e3, 1),
                         tb_s=round((w4_bytes + 2 * k * n) / ms / 1e9, 2))
            if m > 16:
                launches = [(path, lambda i, p=path: w4a16_matmul(x, *w4[i], 128, None, p))
                            for path in ("dequant", "gemm")]
                launches += [(c, lambda i, c=c: w4a16_gemm(x, *w4[i], 128, c)) for c in GEMM]
            else:
                configs = FMA if m == 1 else FMA[:1] + FMA[3:4] + DOT if m <= 4 else DOT
                if m == 1:   # one row as the model runs it: with the projection's prologue
                    configs = [c for c in configs if c.fixup or PROLOGUES[name] == SILU_AND_MUL]
                    launches = [(c, _with_prologue(name, x, w4, c)) for c in configs]
                else:
                    launches = [(c, lambda i, c=c: w4a16_gemv(x, *w4[i], 128, c)) for c in configs]
                launches += [(c, lambda i, c=c: w4a16_gemm(x, *w4[i], 128, c)) for c in FEW if m > 1]
            for what, fn in launches:
                label = what if isinstance(what, str) else _name(what)
                try:
                    ms = _timer(fn, len(w4))
                except Exception as exc:   # a launch that does not compile is reported, not fatal
                    emit("SWEEP", layer=name, m=m, launch=label, error=f"{type(exc).__name__}: {exc}"[:300])
                    continue
                emit("SWEEP", **common, launch=label, w4_us=round(ms * 1e3, 1), vs_bf16=round(bf16_ms / ms, 2),
                     w4_tb_s=round(w4_bytes / ms / 1e9, 2))
                kind = "path" if isinstance(what, str) else "gemm" if isinstance(what, GemmConfig) else "gemv"
                if key not in best or ms < best[key]["ms"]:
                    best[key] = dict(ms=ms, kind=kind, config=label if kind == "path" else dataclasses.asdict(what))
            emit("TUNED", key=key, us=round(best[key]["ms"] * 1e3, 1), launch_kind=best[key]["kind"], config=best[key]["config"],
                 tb_s=round(w4_bytes / best[key]["ms"] / 1e9, 2))
            if m <= 64:
                _tinygemm(name, m, x, w4, tinygemm, w4_bytes, best[key]["ms"])
            _save(best)
        if m == 1:
            linears_ms = sum(best[f"1,{k},{n}"]["ms"] for _, k, n in SHAPES)
            emit("FLOOR", m=1, layer_linears_us=round(linears_ms * 1e3, 1), lm_head_us=round(head_ms * 1e3, 1),
                 step_linears_ms=round(LAYERS * linears_ms + head_ms, 3),
                 tok_s_if_nothing_else=round(1e3 / (LAYERS * linears_ms + head_ms), 1))


def _tinygemm_layer(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """The same int4 weight for torch's own int4 GEMM (tinygemm: torch._weight_int4pack_mm, the
    kernel torchao's int4 weight-only path runs): (packed weight, scales_and_zeros, the op).
    tinygemm dequantizes (q - 8) * scale + zero, so its zero is (8 - our zero) * scale."""
    from pagedserve.layers.quantization.int4 import unpack_int32
    w_nk = unpack_int32(qweight, 0).t().contiguous()   # [N, K], values 0..15
    scales_and_zeros = torch.stack([scales, (8 - zeros) * scales], -1).to(scales.dtype).contiguous()
    if SMOKE:
        return (torch._convert_weight_to_int4pack_for_cpu(w_nk, 8), scales_and_zeros,
                torch._weight_int4pack_mm_for_cpu)
    packed = (w_nk[:, ::2] << 4 | w_nk[:, 1::2]).to(torch.uint8)
    return torch._convert_weight_to_int4pack(packed, 8), scales_and_zeros, torch._weight_int4pack_mm


def _tinygemm(name: str, m: int, x: torch.Tensor, w4: list, cache: dict, w4_bytes: int, best_ms: float) -> None:
    """A reference point, not a launch the engine routes to: torch's tinygemm on the same
    weights (checked against the dequantized reference first) and its time against ours."""
    from pagedserve.layers.quantization.int4 import dequantize_int4
    try:
        if name not in cache:
            cache[name] = [_tinygemm_layer(*w) for w in w4]
            packed, sz, op = cache[name][0]
            ref = x.float() @ dequantize_int4(*w4[0], 128, None, x.dtype).float()
            emit("TINYGEMM_CHECK", layer=name, rel_err=_rel(op(x, packed, 128, sz), ref))
        tg = cache[name]
        ms = _timer(lambda i: tg[i][2](x, tg[i][0], 128, tg[i][1]), len(tg))
        emit("TINYGEMM", layer=name, m=m, us=round(ms * 1e3, 1), tb_s=round(w4_bytes / ms / 1e9, 2),
             ours_us=round(best_ms * 1e3, 1), ours_vs_tinygemm=round(ms / best_ms, 2))
    except Exception as exc:   # torch without it, or a shape it refuses: no figure
        emit("TINYGEMM", layer=name, m=m, error=f"{type(exc).__name__}: {exc}"[:300])


def load_tuned() -> None:
    from pagedserve.layers.quantization import triton_w4a16
    from pagedserve.layers.quantization import triton_w4a16_gemv
    if not os.path.exists(TUNED_FILE):
        emit("TUNED", note=f"no {TUNED_FILE}: default launches")
        return
    with open(TUNED_FILE) as f:
        tuned = json.load(f)
    for kind, table, cls in (("gemv", triton_w4a16_gemv.TUNED, GemvConfig), ("gemm", triton_w4a16.GEMM_TUNED, GemmConfig)):
        for key, config in tuned.get(kind, {}).items():   # (an older file: flat, no kinds)
            table[tuple(int(v) for v in key.split(","))] = cls(**config)
    for key in tuned.get("path", {}):   # dequantize + cuBLAS measured faster: no static launch for it
        for table in (triton_w4a16_gemv.TUNED, triton_w4a16.GEMM_TUNED):
            table.pop(tuple(int(v) for v in key.split(",")), None)
    for _, k, n in SHAPES:   # no M = 1 launch measured (a stage cut short, or none compiled): tl.dot
        triton_w4a16_gemv.TUNED.setdefault((1, k, n), triton_w4a16_gemv.DOT_GEMV)
    emit("TUNED", gemv=len(triton_w4a16_gemv.TUNED), gemm=len(triton_w4a16.GEMM_TUNED))


def timed_engine(variant: str, workloads: tuple[str, ...] = ("b1_decode", "ttft1024", "thr")):
    """quant_gpu.run_timing of llama-8b dummy `variant` (thr512), the LLM returned; under --cpu-smoke
    a 2-layer model on CPU with tiny workloads, and None (the e2e stages of this script,
    w4_gemv_gpu.py and w4_handoff_gpu.py)."""
    if SMOKE:
        shape = dict(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=False)
        run_timing(variant, 2, shape=shape, decode_tokens=8, device="cpu", max_model_len=1100, max_num_seqs=4,
                   workloads=workloads)
        return None
    return run_timing(variant, 512, workloads=workloads)


def try_decode_profile(label: str, llm) -> None:
    """decode_profile, its failure one PROFILE line (the figures before it stand without it)."""
    try:
        decode_profile(label, llm)
    except Exception as exc:
        emit("PROFILE", variant=label, error=f"{type(exc).__name__}: {exc}"[:300])


def e2e(variant: str) -> None:
    if variant == "w4a16":
        load_tuned()
    llm = timed_engine(variant)
    if llm is not None:
        try_decode_profile(variant, llm)


def decode_profile(variant: str, llm) -> None:
    """Where a b1 step goes: the one-row CUDA graph replayed alone (the step's GPU time; b1_decode
    adds the host's), then the kernel table of one eager one-row forward (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    graphs = llm.engine.core.executor.runner.graph_runner
    torch.cuda.synchronize()
    start = time.time()
    for _ in range(50):
        graphs.graphs[1].replay()
    torch.cuda.synchronize()
    emit("PROFILE", variant=variant, graph_replay_bs1_ms=round((time.time() - start) * 20, 3))
    with torch.inference_mode():
        graphs._forward(1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graphs._forward(1)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60), flush=True)
    kernels = sorted(((e.time_range.start, e.name, e.time_range.elapsed_us()) for e in prof.events()
                      if e.device_type.name == "CUDA"), key=lambda e: e[0])
    per_layer = [us for _, name, us in kernels if name in ("_w4_gemv_fma_kernel", "_gemv_kernel")][:4 * LAYERS]
    if len(per_layer) == 4 * LAYERS:   # the layers' linears in order: qkv, o, gate_up, down
        emit("PROFILE", variant=variant, linear_us_in_step={
            proj: round(sum(per_layer[i::4]) / LAYERS, 1) for i, proj in enumerate(("qkv", "o", "gate_up", "down"))})
    emit("PROFILE", variant=variant, layer0_kernels=[(name[:28], round(us, 1)) for _, name, us in kernels[:12]])


def perplexity() -> None:
    """benchmarks/quant_perplexity.py on CUDA in bf16 (every variant; the default model must be
    installed, as w4_gpu.sh does from .devcarry)."""
    if SMOKE:
        return
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "quant_perplexity.py"), "--device", "cuda", "--dtype",
           "bfloat16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    tail = []
    for line in proc.stdout:   # each variant's line as it comes (the stage may be cut short)
        tail = (tail + [line])[-40:]
        if "RESULT" in line or "Error" in line:
            print(line, end="", flush=True)
    if proc.wait():
        print("".join(tail), flush=True)
        FAILED.append(f"quant_perplexity exit {proc.returncode}")


def run_stage(stage: str) -> None:
    if stage == "ppl":
        perplexity()
    elif stage == "kernels":
        check_kernels()
        print(f"CHECK_SUMMARY failed={len(FAILED)} {FAILED[:20]}", flush=True)
        sweep()
    else:
        e2e(stage.split("_")[1])
    print(f"STAGE_SUMMARY {stage} failed={len(FAILED)} {FAILED[:20]}", flush=True)
    sys.exit(1 if FAILED else 0)


PARTS = {"a": ["kernels"], "b": ["e2e_w4a16", "e2e_bf16", "ppl"]}


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--cpu-smoke"]
    if args and args[0] in STAGES:
        run_stage(args[0])
        return
    if args and args[0] not in PARTS:
        sys.exit(__doc__)
    stages = PARTS[args[0]] if args else list(STAGES)
    log = open(os.path.join(os.environ["OUT"], f"w4_gpu{args[0] if args else ''}.txt"), "w") if os.environ.get("OUT") else None
    if "kernels" in stages and os.path.exists(TUNED_FILE):
        os.remove(TUNED_FILE)
    run_stages(os.path.abspath(__file__), {stage: STAGES[stage] for stage in stages}, log)


def run_stages(script: str, stages: dict[str, int], log) -> list[str]:
    """Each stage of `script` in a child process with its time limit (s), its output printed and
    logged as it ends; returns the stages that failed or timed out."""
    failed = []
    for stage, limit in stages.items():
        start = time.time()
        cmd = [sys.executable, script, stage] + (["--cpu-smoke"] if SMOKE else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        try:
            out, _ = proc.communicate(timeout=limit * (20 if SMOKE else 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += f"\nSTAGE {stage} TIMED OUT after {limit} s\n"
        text = out + f"STAGE {stage} exit={proc.returncode} wall_s={time.time() - start:.1f}\n"
        failed += [stage] if proc.returncode else []
        print(text, end="", flush=True)
        if log:
            log.write(text)
            log.flush()
    return failed


if __name__ == "__main__":
    main()
