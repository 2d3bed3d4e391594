"""Does where a decode batch's KV blocks lie change the decode attention's time? (issue 22)

Session 22 fitted the decode attention at thr512's shapes as ~17-30 us a launch plus the bytes at
4.2-4.4 TB/s, on a compact pool with a shuffled block table. This times the same launch (the
engine's paged_attention decode path, bf16, block 16) in a CUDA graph of one launch per layer
over the engine's KV layout (one [2 * layers, blocks, 16, heads, dim] tensor, K of layer i plane
2i), with the batch's blocks laid out as:
  seq       each sequence's blocks contiguous, sequences adjacent (pool = the blocks used)
  shuffled  a random permutation of a pool of the blocks used (attn_gpu.py's micro / tail)
  engine    what BlockPool hands out to a thr512-like batch: each prompt's blocks contiguous in
            admission order, then the decode blocks one per sequence in turn (interleaved)
  spread8   the blocks used drawn at random from a pool 8x their number (a big pool, sparse use)
  seq8      seq's contiguous runs placed at random offsets in a pool 8x their number
Per shape and layout: us a launch, KV GB/s; per layout the fitted fixed part (us) and slope (TB/s)
over the shapes. Usage: python3 benchmarks/decode_locality.py [--heads 32,8,64] [--layers 16]
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch
import triton

from pagedserve.attention.triton_paged_attention import paged_attention

BS = 16
SHAPES = [("512x200-600", 512, 200, 600), ("256x200-600", 256, 200, 600), ("512x100-300", 512, 100, 300),
          ("128x512-1536", 128, 512, 1536), ("384x200-1400", 384, 200, 1400)]
LAYOUTS = ("seq", "shuffled", "engine", "spread8", "seq8")


def block_tables(layout: str, nblocks: list[int], gen: torch.Generator, rng: random.Random
                 ) -> tuple[torch.Tensor, int]:
    """[rows, max blocks] int32 block table and the pool's block count for `layout`."""
    used = sum(nblocks)
    table = torch.zeros(len(nblocks), max(nblocks), dtype=torch.int32)
    if layout in ("seq", "seq8"):
        pool = used * (8 if layout == "seq8" else 1)
        if layout == "seq":
            starts = [sum(nblocks[:s]) for s in range(len(nblocks))]
        else:   # disjoint runs at random offsets: cut the spare blocks into random gaps
            spare = pool - used
            cuts = sorted(rng.randint(0, spare) for _ in range(len(nblocks)))
            order = list(range(len(nblocks)))
            rng.shuffle(order)
            starts, pos, prev = [0] * len(nblocks), 0, 0
            for cut, s in zip(cuts, order):
                pos += cut - prev
                prev = cut
                starts[s] = pos
                pos += nblocks[s]
        for s, n in enumerate(nblocks):
            table[s, :n] = torch.arange(starts[s], starts[s] + n, dtype=torch.int32)
        return table, pool
    if layout == "engine":   # prompts (~70% of each context) contiguous, then decode blocks interleaved
        prompt = [max(1, int(n * 0.7)) for n in nblocks]
        ids, nxt = [[] for _ in nblocks], 0
        for s, n in enumerate(prompt):
            ids[s] = list(range(nxt, nxt + n))
            nxt += n
        while any(len(ids[s]) < nblocks[s] for s in range(len(nblocks))):
            for s in range(len(nblocks)):
                if len(ids[s]) < nblocks[s]:
                    ids[s].append(nxt)
                    nxt += 1
        for s, row in enumerate(ids):
            table[s, :len(row)] = torch.tensor(row, dtype=torch.int32)
        return table, used
    pool = used * (8 if layout == "spread8" else 1)
    perm = torch.randperm(pool, generator=gen)[:used].to(torch.int32)
    at = 0
    for s, n in enumerate(nblocks):
        table[s, :n] = perm[at:at + n]
        at += n
    return table, pool


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="32,8,64", help="query heads, KV heads, head dim (llama-1b)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--bound", type=int, default=2048, help="max_seq_len the launch is built for (graphs: max_model_len)")
    args = ap.parse_args()
    hq, hkv, d = (int(v) for v in args.heads.split(","))
    dev, dtype = torch.device("cuda"), torch.bfloat16
    print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                          heads=args.heads, layers=args.layers, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))))
    results = []
    for label, rows, lo, hi in SHAPES:
        rng = random.Random(rows * 7 + lo)
        contexts = [rng.randint(lo, hi) for _ in range(rows)]
        seq_lens = torch.tensor([c + 1 for c in contexts], dtype=torch.int32, device=dev)
        nblocks = [-(-(c + 1) // BS) for c in contexts]
        kv_bytes = sum(c + 1 for c in contexts) * hkv * d * 2 * 2
        qsl = torch.arange(rows + 1, dtype=torch.int32, device=dev)
        query = torch.randn(rows, hq, d, device=dev, dtype=dtype)
        out = torch.empty_like(query)
        for layout in args.layouts.split(","):
            gen = torch.Generator().manual_seed(rows)
            table, pool = block_tables(layout, nblocks, gen, rng)
            table = table.to(dev)
            cache = torch.empty((2 * args.layers, pool, BS, hkv, d), device=dev, dtype=dtype).normal_()

            def step(cache=cache):
                for i in range(args.layers):
                    paged_attention(query, cache[2 * i], cache[2 * i + 1], table, seq_lens, qsl, d ** -0.5, 1,
                                    args.bound, num_decodes=rows, out=out)
            step()
            assert torch.isfinite(out).all(), layout
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            us = triton.testing.do_bench(graph.replay, warmup=10, rep=60, return_mode="median") * 1e3 / args.layers
            r = dict(shape=label, layout=layout, pool_gib=round(cache.numel() * 2 / 2**30, 2), us=round(us, 2),
                     kv_mb=round(kv_bytes / 1e6, 1), gb_s=round(kv_bytes / us / 1e3, 1))
            print("RESULT " + json.dumps(r), flush=True)
            results.append(r)
            del graph, cache, step
            torch.cuda.empty_cache()
    print(f"\n{'shape':<14}" + "".join(f"{lay:>12}" for lay in args.layouts.split(",")) + "   (us a launch)")
    for label, *_ in SHAPES:
        print(f"{label:<14}" + "".join(f"{r['us']:12.1f}" for r in results if r["shape"] == label))
    for layout in args.layouts.split(","):   # least squares: us = fixed + bytes / slope
        pts = [(r["kv_mb"], r["us"]) for r in results if r["layout"] == layout]
        n, sx, sy = len(pts), sum(p[0] for p in pts), sum(p[1] for p in pts)
        sxx, sxy = sum(p[0] ** 2 for p in pts), sum(p[0] * p[1] for p in pts)
        k = (n * sxy - sx * sy) / (n * sxx - sx * sx)
        fixed = (sy - k * sx) / n
        print(f"fit {layout:<9} fixed {fixed:6.1f} us, slope {1 / k if k else 0:5.2f} TB/s")


if __name__ == "__main__":
    main()
