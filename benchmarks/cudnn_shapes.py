"""Issue 22, long64: what torch's cuDNN attention costs per new shape, and how fast it runs on the
fixed shapes a chunk after a cached context could be cut into.

The cuDNN path (sdpa_prefill) runs ~600 TFLOP/s where the Triton prefill kernel runs ~440 on
long64's chunks after a context, but torch builds one cuDNN graph per (query, key) length and
long64's chunks all differ (session 6: 30.9 s against 25.6 s). Two numbers decide whether a
fixed-shape cut is worth building: (1) the first call of a new shape against its steady time
(the graph build), over a dozen shapes; (2) TFLOP/s of the pieces such a cut would run: the
context part (not causal: rows independent, so queries can be cut or padded freely) in fixed
(query, key) blocks, and the causal new part in fixed square blocks.

    PYTHONPATH=$PWD python3 benchmarks/cudnn_shapes.py     (CUDA only; ~30 s on an H200)
"""
from __future__ import annotations

import json
import time

import torch
import triton

from pagedserve.attention.sdpa_prefill import sdpa_with_lse

HQ, HKV, D = 32, 8, 128   # llama-8b


def attn(q, k, v, causal):
    return sdpa_with_lse(q, k, v, causal, D ** -0.5)   # the engine's cuDNN call (sdpa_prefill)


def tensors(lq: int, lk: int, batch: int = 1):
    g = torch.Generator(device="cuda").manual_seed(lq * 7 + lk)
    q = torch.randn(batch, HQ, lq, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(batch, HKV, lk, D, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(batch, HKV, lk, D, device="cuda", generator=g, dtype=torch.bfloat16)
    return q, k, v


def main() -> None:
    # (1) build cost: shapes none of which ran before in this process
    builds = []
    for lq, lk in ((3000, 12000), (3001, 12000), (2500, 9100), (5192, 5192), (777, 10777), (6000, 6100),
                   (1024, 4096), (2048, 4096), (4096, 4096), (1024, 8192), (1536, 9000), (4000, 14000)):
        q, k, v = tensors(lq, lk)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        attn(q, k, v, False)
        torch.cuda.synchronize()
        first = (time.perf_counter() - t0) * 1e3
        steady = triton.testing.do_bench(lambda: attn(q, k, v, False), warmup=5, rep=20, return_mode="median")
        builds.append(first - steady)
        print("RESULT " + json.dumps(dict(stage="first_call", q=lq, k=lk, first_ms=round(first, 2),
                                          steady_ms=round(steady, 3))), flush=True)
    builds.sort()
    print("RESULT " + json.dumps(dict(stage="build_ms", median=round(builds[len(builds) // 2], 1),
                                      min=round(builds[0], 1), max=round(builds[-1], 1))), flush=True)
    # (2) throughput of fixed pieces (steady, graph built): context blocks and causal squares,
    # batched (one call, several sequences' blocks) where the batch dimension would carry them
    for lq, lk, causal, batch in ((1024, 1024, False, 1), (1024, 4096, False, 1), (2048, 4096, False, 1),
                                  (1024, 4096, False, 8), (4096, 4096, False, 2), (8192, 8192, False, 1),
                                  (1024, 1024, True, 1), (1024, 1024, True, 8), (2048, 2048, True, 4),
                                  (4096, 4096, True, 2), (8192, 8192, True, 1)):
        q, k, v = tensors(lq, lk, batch)
        attn(q, k, v, causal)
        ms = triton.testing.do_bench(lambda: attn(q, k, v, causal), warmup=10, rep=40, return_mode="median")
        pairs = lq * lk if not causal else lq * (lq + 1) / 2
        flop = 4.0 * D * HQ * pairs * batch
        print("RESULT " + json.dumps(dict(stage="piece", q=lq, k=lk, causal=causal, batch=batch, ms=round(ms, 3),
                                          tflops=round(flop / ms / 1e9, 1))), flush=True)


if __name__ == "__main__":
    main()
