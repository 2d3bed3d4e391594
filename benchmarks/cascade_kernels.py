"""Cascade attention's two launches at prefix256's decode shape (llama-8b heads 32 / 8 / 128, bf16,
256 rows sharing a 2,048-token cached prefix, each with 64-192 keys of its own, block size 16, a
CUDA graph's plan for max_model_len 32768), timed alone. Session 52's profile (H100): plain decode
launch 441 us a layer; with the cascade 109 us (decode) + 74 us (prefix), where the bytes and FLOPs
allow ~40 + ~15. Session 53 swept the prefix launch's tiles and the decode launch's tiles and plan
(RESULTS.md); this script keeps the before / after and the prefix launch's nearest alternatives.

Each variant is a CUDA graph of 16 calls, replayed 7 times interleaved with the others (medians);
the outputs' largest difference from the plain launch is printed (bf16 rounding).
  plain              paged_attention, rotary_store, no cascade (the graph's plan)
  cascade            the same with the cascade (prefix launch + decode launch), the defaults
  cascade_s52        session 52's: prefix launch 2 stages, decode launch default tiles, uncapped plan
  cascade_nosplit    the cascade, the decode launch not split at all
  cascade_plaintiles the cascade, the decode launch under the plain launch's tiles and plan
  prefix[...]        triton_cascade.cascade_prefix alone under a tile config (BLOCK_M, TILE_N, warps,
                     stages, programs an SM)
Usage: [ROWS=256] PYTHONPATH=$PWD python3 benchmarks/cascade_kernels.py   (CPU: a tiny smoke, Triton's interpreter)
ROWS: the decode rows (session 54: fewer, for the cascade's row threshold). MEMBERS (default ROWS): only rows
[0, MEMBERS) take the cascade (one group); the others read their whole context in the cascade's decode launch, as
rows of other prompts do when one group of a step takes it (session 55)
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.decode_common import replay_ms  # noqa: E402
from pagedserve.attention import cascade_plan, triton_cascade as tc  # noqa: E402
from pagedserve.attention.paged_launch import TileConfig, launch_plan  # noqa: E402
from pagedserve.attention.split_plan import NO_SPLIT  # noqa: E402
from pagedserve.attention.triton_paged_attention import paged_attention  # noqa: E402
from pagedserve.attention.triton_store_kv import RotaryStore  # noqa: E402
from pagedserve.layers.rotary import RotaryEmbedding  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
HQ, HKV, D, BS = (32, 8, 128, 16) if CUDA else (8, 2, 64, 16)
ROWS, PREFIX, OWN = (int(os.environ.get("ROWS", "256")), 2048, (64, 192)) if CUDA else (8, 64, (8, 40))
MAX_LEN = 32768 if CUDA else 1024
MEMBERS = int(os.environ.get("MEMBERS", ROWS))
DTYPE = torch.bfloat16 if CUDA else torch.float32


def batch(seed: int = 0):
    """ROWS decode rows: PREFIX shared keys (the same block ids), then each row's own blocks."""
    rng = random.Random(seed)
    shared = PREFIX // BS
    own = [rng.randint(*OWN) for _ in range(ROWS)]
    own_blocks = [-(-(n + 1) // BS) for n in own]
    num_blocks = shared + sum(own_blocks) + 1
    ids = torch.randperm(num_blocks).tolist()
    width = shared + max(own_blocks)
    tables = torch.zeros(ROWS, width, dtype=torch.int32)
    slots, at = [], shared
    for r, n in enumerate(own_blocks):
        mine = ids[at:at + n]
        at += n
        tables[r, :shared + n] = torch.tensor(ids[:shared] + mine, dtype=torch.int32)
        pos = PREFIX + own[r]
        slots.append(mine[own[r] // BS] * BS + pos % BS)
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(num_blocks, BS, HKV, D, generator=g).to(DEV, DTYPE)
    vc = torch.randn(num_blocks, BS, HKV, D, generator=g).to(DEV, DTYPE)
    q = torch.randn(ROWS, HQ, D, generator=g).to(DEV, DTYPE)
    k = torch.randn(ROWS, HKV, D, generator=g).to(DEV, DTYPE)
    v = torch.randn(ROWS, HKV, D, generator=g).to(DEV, DTYPE)
    seq_lens = torch.tensor([PREFIX + n + 1 for n in own], dtype=torch.int32, device=DEV)
    rope = RotaryEmbedding(D, MAX_LEN, 500000.0, dtype=DTYPE).to(DEV)
    store = RotaryStore(k, v, torch.tensor(slots, device=DEV), rope.cos_cache, rope.sin_cache)
    cascade = tuple(torch.from_numpy(a).to(DEV) for a in cascade_plan.cascade_arrays(
        np.array([PREFIX] * MEMBERS + [0] * (ROWS - MEMBERS)), [np.arange(MEMBERS)]).values())
    qsl = torch.arange(ROWS + 1, dtype=torch.int32, device=DEV)
    kv_bytes = (PREFIX + sum(own)) * HKV * D * 2 * kc.element_size()
    return dict(q=q, kc=kc, vc=vc, tables=tables.to(DEV), seq_lens=seq_lens, qsl=qsl, store=store, cascade=cascade,
                own_keys=sum(own), kv_bytes=kv_bytes)


def attend(b, cascade: bool, num_splits=None, tiles=None):
    out = torch.empty_like(b["q"])
    return lambda: paged_attention(b["q"], b["kc"], b["vc"], b["tables"], b["seq_lens"], b["qsl"], D ** -0.5, 1,
                                   MAX_LEN, num_decodes=ROWS, out=out, num_splits=num_splits, tiles=tiles,
                                   rotary_store=b["store"], cascade=b["cascade"] if cascade else None)


def prefix_only(b):
    return lambda: tc.cascade_prefix(b["q"], b["kc"], b["vc"], b["tables"], b["seq_lens"], b["cascade"],
                                     b["store"].cos_cache, b["store"].sin_cache, D ** -0.5)


CONFIGS = {   # the prefix launch's BLOCK_M, TILE_N, NUM_WARPS, NUM_STAGES, PROGRAMS_PER_SM
    "64/64/w4/s2/p2": (64, 64, 4, 2, 2),   # session 52's
    "64/64/w4/s3/p2": (64, 64, 4, 3, 2),
    "64/64/w4/s4/p2": (64, 64, 4, 4, 2),
    "64/64/w4/s3/p1": (64, 64, 4, 3, 1),   # session 53's (the default)
    "128/64/w8/s3/p2": (128, 64, 8, 3, 2),
}
DEFAULT = "64/64/w4/s3/p1"
# session 52's decode launch under the cascade: the default decode tiles, the graph's uncapped plan
S52_TILES = TileConfig(16, 64, 4, 3) if CUDA else TileConfig(16, 32, 4, 3)


def set_config(cfg) -> None:
    tc.BLOCK_M, tc.TILE_N, tc.NUM_WARPS, tc.NUM_STAGES, tc.PROGRAMS_PER_SM = cfg


def graph_of(fn, calls: int = 16):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return g


def main() -> None:
    b = batch()
    set_config(CONFIGS[DEFAULT])
    ref = attend(b, False)().clone()
    s52_plan = launch_plan(ROWS, HQ, HKV, D, 1, MAX_LEN, DTYPE, DEV, tiles=S52_TILES)[1]
    plain_tiles, plain_plan, _ = launch_plan(ROWS, HQ, HKV, D, 1, MAX_LEN, DTYPE, DEV)
    variants = {"plain": (DEFAULT, attend(b, False)), "cascade": (DEFAULT, attend(b, True)),
                "cascade_s52": ("64/64/w4/s2/p2", attend(b, True, s52_plan, S52_TILES)),
                "cascade_nosplit": (DEFAULT, attend(b, True, NO_SPLIT)),
                "cascade_plaintiles": (DEFAULT, attend(b, True, plain_plan, plain_tiles))}
    for name in CONFIGS:
        variants[f"prefix[{name}]"] = (name, prefix_only(b))
    errors = {}
    for name, (cfg, fn) in variants.items():
        if name.startswith("cascade"):
            set_config(CONFIGS[cfg])
            errors[name] = float(f"{(fn().float() - ref.float()).abs().max().item():.2g}")
    print("RESULT " + json.dumps(dict(workload="cascade max abs error vs plain", **errors)), flush=True)
    if not CUDA:
        return
    graphs = {}
    for name, (cfg, fn) in variants.items():
        set_config(CONFIGS[cfg])
        graphs[name] = graph_of(fn)
    set_config(CONFIGS[DEFAULT])
    times = {n: [] for n in graphs}
    for _ in range(7):
        for name, g in graphs.items():
            times[name].append(replay_ms(g, 1) * 1000 / 16)
    us = {n: round(sorted(t)[3], 1) for n, t in times.items()}
    print("RESULT " + json.dumps(dict(workload="cascade kernels us a call", device=torch.cuda.get_device_name(),
                                      rows=ROWS, members=MEMBERS, prefix=PREFIX, own_keys=b["own_keys"],
                                      kv_gb=b["kv_bytes"] / 1e9,
                                      **us)), flush=True)


if __name__ == "__main__":
    main()
