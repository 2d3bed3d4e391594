"""Issue 19: one GGUF GEMV at the default model's shapes (SmolLM2-135M: Q4_1 layers, Q8_0 tied
LM head), the C++ kernels with fp32 activations against Q8 activations (integer dots),
interleaved in one process: call A, call B, A, B, ... (a shared machine moves both alike).

"hot": one matrix, called again and again (in cache); "cold": cycling through 30 copies (the
model's 30 layers: weights stream from memory as in a decode step). Prints the median us per
call of each and the ratio.

--gemm ROWS,...: for each row count, the Q8 product (GEMV passes up to 3 rows, the GEMM's
tiles from 4) against what products of more than gguf.CPP_MAX_ROWS rows ran before: the
weight dequantized for the call + torch's GEMM in gguf.gemm_dtype() (fp32 without native
bf16), interleaved the same way, cold (30 copies; the LM head hot). --baseline DIR adds a
third call: the Q8 product of the checkout in DIR (its gguf_cpu.py and its build), e.g. the
GEMV's 4-row passes before the GEMM.

Usage: PYTHONPATH=. python benchmarks/gguf_q8_gemv.py [--threads 1] [--reps 200] [--rows 1]
       PYTHONPATH=. python benchmarks/gguf_q8_gemv.py --gemm 16,32,64,128,256 [--reps 30] [--baseline ../main]"""
import argparse
import json
import os
import statistics
import time

import torch

from pagedserve.layers.quantization import gguf_cpu
from tests.unit.test_gguf_kernels import random_blocks

SHAPES = [("qkv", "Q4_1", 960, 576), ("o", "Q4_1", 576, 576), ("gate_up", "Q4_1", 3072, 576),
          ("down", "Q4_1", 576, 1536), ("lm_head", "Q8_0", 49152, 576)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--gemm", default="", help="row counts: Q8 product against dequantize + GEMM")
    ap.add_argument("--baseline", help="--gemm: also the Q8 product of the checkout in this folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.gemm:
        return gemm(args)
    out = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), threads=args.threads, rows=args.rows,
               load_average_1m=[round(os.getloadavg()[0], 2)], shapes={})
    for name, fmt, n, k in SHAPES:
        copies = 1 if name == "lm_head" else 30
        mats = [torch.from_numpy(random_blocks(fmt, n, k, seed=i)) for i in range(copies)]
        x = torch.randn(args.rows, k)
        assert (gguf_cpu.gemv(x, mats[0], fmt, True) - gguf_cpu.gemv(x, mats[0], fmt)).abs().max() \
            < 0.05 * gguf_cpu.gemv(x, mats[0], fmt).abs().max()
        row = {}
        for mode, pool in (("hot", mats[:1]), ("cold", mats)):
            if name == "lm_head" and mode == "cold":
                continue
            times = {False: [], True: []}
            reps = args.reps if name != "lm_head" else max(10, args.reps // 10)
            for i in range(reps):
                for q8 in (False, True):
                    w = pool[i % len(pool)]
                    t0 = time.perf_counter()
                    gguf_cpu.gemv(x, w, fmt, q8)
                    times[q8].append(time.perf_counter() - t0)
            fp32, q8 = (statistics.median(times[b]) * 1e6 for b in (False, True))
            row[mode] = dict(fp32_us=round(fp32, 1), q8_us=round(q8, 1), speedup=round(fp32 / q8, 2),
                             q8_gb_s=round(mats[0].numel() / q8 / 1e3, 1))
        out["shapes"][f"{name} {fmt} {n}x{k}"] = row
        print(name, fmt, f"{n}x{k}", json.dumps(row), flush=True)
    out["load_average_1m"].append(round(os.getloadavg()[0], 2))
    print(json.dumps(out))


def baseline_module(checkout: str):
    """The gguf_cpu module of another checkout (its own sources, its own build)."""
    import importlib.util
    path = os.path.join(os.path.abspath(checkout), "pagedserve", "layers", "quantization", "gguf_cpu.py")
    spec = importlib.util.spec_from_file_location("baseline_gguf_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.extension() is not None, f"{checkout}: the GGUF CPU kernels do not build"
    return module


def gemm(args) -> None:
    from pagedserve.layers.quantization.gguf import gemm_dtype
    dtype = gemm_dtype()
    base = baseline_module(args.baseline) if args.baseline else None
    out = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), threads=args.threads, gemm_dtype=str(dtype),
               load_average_1m=[round(os.getloadavg()[0], 2)], rows={})
    for name, fmt, n, k in SHAPES:
        copies = 1 if name == "lm_head" else 30
        mats = [torch.from_numpy(random_blocks(fmt, n, k, seed=i)) for i in range(copies)]
        for rows in (int(r) for r in args.gemm.split(",")):
            x = torch.randn(rows, k)
            calls = {"q8": lambda w: gguf_cpu.gemv(x, w, fmt, True),
                     "dequant_gemm": lambda w: torch.matmul(x.to(dtype), gguf_cpu.dequantize(w, fmt, dtype).t())}
            if base is not None:
                calls["baseline_q8"] = lambda w: base.gemv(x, w, fmt, True)
            ref = calls["dequant_gemm"](mats[0]).float()
            assert (calls["q8"](mats[0]) - ref).abs().max() < 0.05 * ref.abs().max()
            if base is not None:   # the same arithmetic per row
                assert torch.equal(calls["q8"](mats[0]), calls["baseline_q8"](mats[0]))
            times = {key: [] for key in calls}
            reps = args.reps if name != "lm_head" else max(3, args.reps // 10)
            for i in range(reps):
                for key, call in calls.items():
                    w = mats[i % len(mats)]
                    t0 = time.perf_counter()
                    call(w)
                    times[key].append(time.perf_counter() - t0)
            us = {key: statistics.median(times[key]) * 1e6 for key in calls}
            row = dict(q8_us=round(us["q8"], 1), dequant_gemm_us=round(us["dequant_gemm"], 1),
                       speedup=round(us["dequant_gemm"] / us["q8"], 2))
            if base is not None:
                row.update(baseline_q8_us=round(us["baseline_q8"], 1), vs_baseline=round(us["baseline_q8"] / us["q8"], 2))
            out["rows"][f"{name} {fmt} {n}x{k} rows={rows}"] = row
            print(name, fmt, f"{n}x{k}", f"rows={rows}", json.dumps(row), flush=True)
    out["load_average_1m"].append(round(os.getloadavg()[0], 2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
