"""kv_cache_dtype fp8 against the model's bf16 cache in the attention kernels alone (CUDA): the
decode launch at thr512's batch shapes (llama-8b heads 32 / 8 / 128, block 16, contexts
U[300, 1300]) and the prefill kernel (chunks after a cached context), ms a call (triton's
do_bench median) and the K/V bytes a decode call reads per us; FP8_SWEEP=1: the FP8 decode
launch's tile shapes instead. One RESULT line per case."""
from __future__ import annotations

import json
import os
import random

import torch
from triton.testing import do_bench

from pagedserve.attention.triton_paged_attention import paged_attention
from pagedserve.attention.triton_prefill_attention import prefill_attention

HQ, HKV, D, BS = 32, 8, 128, 16
DEV = torch.device("cuda")


def batch(query_lens, context_lens, seed=0):
    rng = random.Random(seed)
    seq_lens = [q + c for q, c in zip(query_lens, context_lens)]
    per_seq = [-(-n // BS) for n in seq_lens]
    ids = list(range(sum(per_seq) + 8))
    rng.shuffle(ids)
    table = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32)
    used = 0
    for s, n in enumerate(per_seq):
        table[s, :n] = torch.tensor(ids[used:used + n], dtype=torch.int32)
        used += n
    k = torch.randn(len(ids), BS, HKV, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(sum(query_lens), HQ, D, device=DEV, dtype=torch.bfloat16)
    qsl = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEV)
    return q, k, v, table.to(DEV), torch.tensor(seq_lens, dtype=torch.int32, device=DEV), qsl, sum(seq_lens)


def main() -> None:
    rng = random.Random(1)
    for rows in (64, 256, 448):
        ctx = [rng.randint(300, 1300) for _ in range(rows)]
        q, k, v, table, seq_lens, qsl, keys = batch([1] * rows, ctx)
        for name, cache in (("bf16", (k, v)), ("fp8", (k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)))):
            out = torch.empty_like(q)
            fn = lambda: paged_attention(q, *cache, table, seq_lens, qsl, D ** -0.5, 1, max(ctx) + 1,  # noqa: E731
                                         num_decodes=rows, out=out)
            ms = do_bench(fn, warmup=50, rep=300)
            read = 2 * keys * HKV * D * cache[0].element_size()
            print("RESULT " + json.dumps(dict(case=f"decode{rows}", cache=name, ms=round(ms, 4),
                                              kv_gb_s=round(read / ms / 1e6, 1))), flush=True)
    if os.environ.get("FP8_SWEEP"):   # decode tiles (tile_n, warps, stages) over the FP8 cache
        from pagedserve.attention.paged_launch import TileConfig
        for rows in (256, 448):
            ctx = [rng.randint(300, 1300) for _ in range(rows)]
            q, k, v, table, seq_lens, qsl, keys = batch([1] * rows, ctx)
            out = torch.empty_like(q)
            for tile_n, warps, stages in ((64, 4, 3), (64, 2, 3)):   # the bf16 cache, for reference
                tiles = TileConfig(16, tile_n, warps, stages)
                ms = do_bench(lambda: paged_attention(q, k, v, table, seq_lens, qsl, D ** -0.5, 1, max(ctx) + 1,
                                                      num_decodes=rows, out=out, tiles=tiles), warmup=30, rep=200)
                print("RESULT " + json.dumps(dict(case=f"sweep{rows}_bf16", tiles=[tile_n, warps, stages],
                                                  ms=round(ms, 4))), flush=True)
            cache = (k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn))
            for tile_n, warps, stages in ((64, 4, 3), (128, 4, 3), (128, 4, 2), (64, 4, 4), (128, 8, 3),
                                          (32, 4, 3), (64, 2, 3), (128, 4, 4), (64, 2, 4), (64, 2, 2), (32, 2, 3),
                                          (128, 2, 3), (64, 1, 3), (32, 1, 3)):
                tiles = TileConfig(16, tile_n, warps, stages)
                fn = lambda: paged_attention(q, *cache, table, seq_lens, qsl, D ** -0.5, 1, max(ctx) + 1,  # noqa: E731
                                             num_decodes=rows, out=out, tiles=tiles)
                ms = do_bench(fn, warmup=30, rep=200)
                print("RESULT " + json.dumps(dict(case=f"sweep{rows}", tiles=[tile_n, warps, stages], ms=round(ms, 4))),
                      flush=True)
        return
    for qlen, clen, n in ((512, 512, 8), (256, 1024, 8)):
        q, k, v, table, seq_lens, qsl, _ = batch([qlen] * n, [clen] * n, seed=2)
        for name, cache in (("bf16", (k, v)), ("fp8", (k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)))):
            out = torch.empty_like(q)
            fn = lambda: prefill_attention(q, None, None, *cache, table, seq_lens, qsl, D ** -0.5, out, 0, n,  # noqa: E731
                                           qlen * n, max_keys=qlen + clen)
            ms = do_bench(fn, warmup=20, rep=200)
            print("RESULT " + json.dumps(dict(case=f"prefill{qlen}after{clen}x{n}", cache=name,
                                              ms=round(ms, 4))), flush=True)


if __name__ == "__main__":
    main()
