"""Issue 22, thr512's first engine: the GPU waits 2-5 ms for the host before each of the first
engine's ~35 prefill steps (8,192 prompt tokens + a varying number of decode rows), and never in
a later engine of the same process (thr_spread.py, session 18). Hypothesis: each step's token
count M is new, and a matmul of a new shape costs the host a cuBLAS heuristic query the first
time. This times the host side of F.linear (no sync inside the timed call) for llama-1b's four
layer shapes at M = 8192 + r, first use against second use, and with a first use of M+1..M+k
after M warmed.

Usage: PYTHONPATH=$PWD python3 benchmarks/gemm_first_use.py OUT"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}


def host_us(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt * 1e6


def main() -> None:
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    dev = torch.device("cuda")
    weights = {k: torch.randn(n, kk, device=dev, dtype=torch.bfloat16) * 0.02 for k, (n, kk) in SHAPES.items()}
    xs = {kk: torch.randn(8192 + 512, kk, device=dev, dtype=torch.bfloat16) for kk in {2048, 8192}}
    res = {"torch": torch.__version__, "machine": torch.cuda.get_device_name(0),
           "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "prefer_cublaslt": str(torch.backends.cuda.preferred_blas_library())}
    for name, w in weights.items():
        x = xs[w.shape[1]]
        first, second = [], []
        for r in range(1, 41):
            m = 8192 + r * 7
            first.append(host_us(lambda: F.linear(x[:m], w)))
            second.append(host_us(lambda: F.linear(x[:m], w)))
        res[name] = dict(first_us_median=round(statistics.median(first), 1), first_us_max=round(max(first), 1),
                         second_us_median=round(statistics.median(second), 1))
        print(name, res[name], flush=True)
    with open(os.path.join(out, "gemm_first_use.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
