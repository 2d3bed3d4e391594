"""Decode-sized matmuls (M rows) of llama-1b / llama-8b: cuBLAS (F.linear) against the Triton
gemv over a grid of launch shapes, weights read from HBM (copies cycled past the L2), each
call timed inside a CUDA graph of many calls. Prints a table and writes JSON.
(A first sweep also tried split K in 2-8 with a deterministic fp32 reduction: never in any
shape's five best, so the kernel has none.) The whole grid is searched at M=1; M=2..16 time the default and M=1's six best.
Usage: python3 benchmarks/gemv_sweep.py OUT.json [quick]"""
import itertools
import json
import sys

import torch

from pagedserve.layers.triton_gemv import DEFAULT_CONFIG, GemvConfig, gemv

SHAPES = {  # name: (N, K)
    "1b.qkv": (3072, 2048), "1b.o": (2048, 2048), "1b.gate_up": (16384, 2048), "1b.down": (2048, 8192),
    "1b.lm_head": (128256, 2048),
    "8b.qkv": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up": (28672, 4096), "8b.down": (4096, 14336),
    "8b.lm_head": (128256, 4096),
}
CALLS = 40


def time_us(fn, weights) -> float:
    """Per-call microseconds of fn(w) cycling over `weights`, replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights[:2]:
            fn(w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(weights[i % len(weights)])
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / CALLS)
    return best


def main() -> None:
    quick = "quick" in sys.argv
    device = torch.device("cuda")
    results = []
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        copies = max(3, -(-600 * 2**20 // nbytes))
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        top_m1 = []
        for m in ([1] if quick else [1, 2, 4, 8, 16]):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ref = (x.float() @ weights[0].float().T)
            cublas = time_us(lambda w: torch.nn.functional.linear(x, w), weights)
            default = DEFAULT_CONFIG
            err = (gemv(x, weights[0]).float() - ref).abs().max().item() / ref.abs().max().item()
            candidates = {default} | set(top_m1)
            if m == 1:
                for bn, bk, warps, stages in itertools.product([16, 32, 64, 128], [128, 256, 512], [4, 8], [3, 4, 6]):
                    if bn * bk <= 64 * 512:
                        candidates.add(GemvConfig(bn, bk, warps, stages))
            timed = []
            for cfg in candidates:
                try:
                    timed.append((time_us(lambda w, c=cfg: gemv(x, w, c), weights), cfg))
                except Exception as exc:   # e.g. out of shared memory for a big tile
                    print(f"  {name} {cfg}: {type(exc).__name__}", file=sys.stderr)
            timed.sort(key=lambda item: item[0])
            best_us, best = timed[0]
            default_us = next(t for t, c in timed if c == default)
            if m == 1:
                top_m1 = [c for _, c in timed[:6]]
            row = dict(shape=name, m=m, n=n, k=k, cublas_us=round(cublas, 2), default_us=round(default_us, 2),
                       best_us=round(best_us, 2), best=best.__dict__, rel_err=err,
                       cublas_tb_s=round(nbytes / cublas / 1e6, 2), best_tb_s=round(nbytes / best_us / 1e6, 2),
                       top5=[(round(t, 2), c.__dict__) for t, c in timed[:5]])
            results.append(row)
            print(f"{name:12s} M={m:2d}  cuBLAS {cublas:7.2f} us ({row['cublas_tb_s']} TB/s)  default "
                  f"{default_us:7.2f}  best {best_us:7.2f} ({row['best_tb_s']} TB/s) {best}  err {err:.1e}",
                  flush=True)
        del weights
        torch.cuda.empty_cache()
    json.dump(results, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
