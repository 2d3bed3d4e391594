"""Would two micro-batches on two streams overlap a decode step's attention with its GEMMs? (issue 22)

At thr512's decode batches the step is the paged decode attention (memory-bound, ~3.5 TB/s)
followed by the layer's GEMMs (compute-bound, cuBLAS): llama-8b at 409 rows 8.6 ms + 13.4 ms
(session 28). Splitting the rows into two halves A and B on two streams, A's attention can run
while B's GEMMs do (NanoFlow / two-batch overlap). This times, per layer in a CUDA graph of all
layers (us a layer, median):
  seq       attention of all rows, then qkv / o / gate_up / down of all rows (today's step, less
            the elementwise launches)
  halves    the same for A then for B on one stream (what halving alone costs: weights read twice)
  overlap   per layer: B's GEMMs beside A's attention, then A's GEMMs beside B's attention, two
            streams joined by events (the pipeline's steady state)
  attn / gemm   either part alone (all rows)
Usage: python3 benchmarks/overlap_probe.py [--model llama-8b|llama-1b] [--rows 410,256,128]
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch
import torch.nn.functional as F
import triton

from pagedserve.attention.triton_paged_attention import paged_attention

BS = 16
MODELS = {"llama-8b": dict(hidden=4096, inter=14336, hq=32, hkv=8, d=128, layers=32),
          "llama-1b": dict(hidden=2048, inter=8192, hq=32, hkv=8, d=64, layers=16)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-8b")
    ap.add_argument("--rows", default="410,256")
    ap.add_argument("--ctx", default="300,1300", help="context lengths drawn uniformly from LO,HI")
    args = ap.parse_args()
    m = MODELS[args.model]
    dev, dt = torch.device("cuda"), torch.bfloat16
    h, inter, hq, hkv, d, nl = m["hidden"], m["inter"], m["hq"], m["hkv"], m["d"], m["layers"]
    print(json.dumps(dict(device=torch.cuda.get_device_name(), model=args.model, triton=triton.__version__,
                          date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))), flush=True)
    weights = [dict(qkv=torch.randn((hq + 2 * hkv) * d, h, device=dev, dtype=dt) * 0.02,
                    o=torch.randn(h, hq * d, device=dev, dtype=dt) * 0.02,
                    gate_up=torch.randn(2 * inter, h, device=dev, dtype=dt) * 0.02,
                    down=torch.randn(h, inter, device=dev, dtype=dt) * 0.02) for _ in range(nl)]
    lo, hi = (int(v) for v in args.ctx.split(","))
    side = torch.cuda.Stream()
    for rows in (int(r) for r in args.rows.split(",")):
        rng = random.Random(rows)
        contexts = [rng.randint(lo, hi) for _ in range(rows)]
        nblocks = [-(-(c + 1) // BS) for c in contexts]
        pool = sum(nblocks)
        perm = torch.randperm(pool).to(torch.int32)
        table = torch.zeros(rows, max(nblocks), dtype=torch.int32)
        at = 0
        for s, n in enumerate(nblocks):
            table[s, :n] = perm[at:at + n]
            at += n
        table = table.to(dev)
        seq_lens = torch.tensor([c + 1 for c in contexts], dtype=torch.int32, device=dev)
        cache = torch.empty((2 * nl, pool, BS, hkv, d), device=dev, dtype=dt).normal_()
        half = rows // 2
        parts = {"all": (0, rows), "A": (0, half), "B": (half, rows)}
        q = {k: torch.randn(b - a, hq, d, device=dev, dtype=dt) for k, (a, b) in parts.items()}
        out = {k: torch.empty_like(v) for k, v in q.items()}
        x = {k: torch.randn(b - a, h, device=dev, dtype=dt) for k, (a, b) in parts.items()}
        act = {k: torch.randn(b - a, inter, device=dev, dtype=dt) for k, (a, b) in parts.items()}
        qsl = {k: torch.arange(b - a + 1, dtype=torch.int32, device=dev) for k, (a, b) in parts.items()}

        def attn(i: int, k: str) -> None:
            a, b = parts[k]
            paged_attention(q[k], cache[2 * i], cache[2 * i + 1], table[a:b], seq_lens[a:b], qsl[k], d ** -0.5,
                            1, 2048, num_decodes=b - a, out=out[k])

        def gemm(i: int, k: str) -> None:
            w = weights[i]
            F.linear(x[k], w["qkv"])
            F.linear(out[k].view(-1, hq * d), w["o"])
            F.linear(x[k], w["gate_up"])
            F.linear(act[k], w["down"])

        def seq() -> None:
            for i in range(nl):
                attn(i, "all")
                gemm(i, "all")

        def halves() -> None:
            for i in range(nl):
                for k in "AB":
                    attn(i, k)
                    gemm(i, k)

        def only_attn() -> None:
            for i in range(nl):
                attn(i, "all")

        def only_gemm() -> None:
            for i in range(nl):
                gemm(i, "all")

        def overlap() -> None:
            main = torch.cuda.current_stream()
            for i in range(nl):
                for first, second in (("A", "B"), ("B", "A")):
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        gemm(i, second)
                    attn(i, first)
                    main.wait_stream(side)

        res = dict(model=args.model, rows=rows, ctx=args.ctx)
        for name, fn in (("seq", seq), ("halves", halves), ("overlap", overlap), ("attn", only_attn),
                         ("gemm", only_gemm)):
            fn()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            res[name] = round(triton.testing.do_bench(graph.replay, warmup=5, rep=50, return_mode="median")
                              * 1e3 / nl, 1)
            del graph
        res["overlap_vs_seq"] = round(res["overlap"] / res["seq"], 3)
        print("RESULT " + json.dumps(res), flush=True)
        cache = None   # the next row count builds its own pool
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
