"""attn_gpu.py's decode and tail stages: the paged decode kernel at batch 1 (split-K or not) and at
the decode-tail shapes of long64 / thr512 (split rules, tile shapes), checked against the fp32
reference, us a call and KV GB/s."""
from __future__ import annotations

import math
import random

from attn_common import DEV, HKV, HQ, SMOKE, D, Paged, args, bench_ms, emit
import torch
import triton

from pagedserve.attention.triton_paged_attention import paged_attention


# --------------------------------------------------------------------------------------- decode
def stage_decode() -> None:
    """Batch-1 decode attention, 32 calls per graph (one per layer): split-K auto vs off."""
    contexts = [64, 300] if SMOKE else [128, 512, 1024, 2048, 4096, 16384]
    for ctx in contexts:
        b = Paged([1], [ctx - 1], torch.float32 if SMOKE else torch.bfloat16, seed=4)
        out = torch.empty_like(b.query)
        result = {}
        for label, splits in (("auto", None), ("off", 1)):
            if SMOKE:
                result[label] = bench_ms(lambda: b.paged(out=out, num_splits=splits))
                continue
            b.paged(out=out, num_splits=splits)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(32):
                    b.paged(out=out, num_splits=splits)
            result[label] = bench_ms(graph.replay) / 32
        from pagedserve.attention.split_plan import choose_splits, sm_count
        splits = choose_splits(1, HKV, 1, ctx, 64, sm_count(DEV)).num_segments
        emit(stage="decode", context=ctx, auto_splits=splits, us_per_call_auto=round(result["auto"] * 1e3, 2),
             us_per_call_no_split=round(result["off"] * 1e3, 2))


# ----------------------------------------------------------------------------------------- tail
# (label, rows, context lo, context hi, max_seq_len bound as the decode graphs pass it: max_model_len)
TAIL_SHAPES = [("long35", 35, 4096, 16384, 32768), ("long35_even", 35, 10240, 10240, 32768),
               ("thr512_400", 512, 200, 600, 2048), ("thr256_600", 256, 300, 900, 2048),
               ("b1_128", 1, 128, 128, 2048), ("b1_400", 1, 400, 400, 2048), ("b1_1k", 1, 1024, 1024, 2048),
               ("b1_4k", 1, 4096, 4096, 4096), ("b4_400", 4, 400, 400, 2048), ("b16_400", 16, 400, 400, 2048),
               ("b1_400_b32k", 1, 400, 400, 32768), ("b1_16k", 1, 16384, 16384, 32768),
               ("long64_4k", 64, 2048, 6144, 32768), ("long16", 16, 4096, 16384, 32768),
               ("long8", 8, 4096, 16384, 32768), ("thr128_1k", 128, 512, 1536, 2048),
               ("thr256_1k", 256, 300, 1400, 2048), ("thr384_800", 384, 200, 1400, 2048),
               ("thr512_eq400", 512, 400, 400, 2048), ("thr512_eq1k", 512, 1024, 1024, 2048)]
TAIL_SMOKE_SHAPES = [("long", 12, 200, 700, 1024), ("thr", 24, 20, 90, 256), ("b1", 1, 150, 150, 256)]
PEAK_GBS = 4000.0   # ~HBM3e bandwidth reachable by a read kernel on the H200 (4.8 TB/s spec)


def _tail_batch(rows: int, lo: int, hi: int, copies: int, seed: int) -> Paged:
    """`copies` disjoint batches of `rows` decodes in one cache (contexts uniform in [lo, hi])."""
    rng = random.Random(seed)
    contexts = [rng.randint(lo, hi) for _ in range(rows)]
    if args.order != "random":   # the launch order of the rows' programs (grid axis 0)
        contexts.sort(reverse=args.order == "desc")
    contexts *= copies
    return Paged([1] * (rows * copies), contexts, torch.float32 if SMOKE else torch.bfloat16, seed=seed)


def _tail_variants(tile_sweep: bool, quick: bool = False):
    """(name, split rule ("nosplit": forced num_splits=1; "reduce": chunked with the partials merged
    by the reduce launch, MERGE_IN_KERNEL off; "plan": the SplitPlan in place of the chunk count, from
    --plans), chunk tiles, TileConfig or None); chunk sizes in keys --chunk-keys across tile widths."""
    from pagedserve.attention.split_plan import SplitPlan
    from pagedserve.attention.triton_paged_attention import TileConfig
    variants = [("legacy", "legacy", 16, None), ("chunk8", "chunked", 8, None), ("chunk16", "chunked", 16, None),
                ("chunk32", "chunked", 32, None), ("chunk32_reduce", "reduce", 32, None), ("nosplit", "nosplit", 16, None)]
    if quick and not (args.tiles or args.plans):
        return [v for v in variants if v[0] != "chunk8"]
    if quick:   # with --tiles / --plans: the default rule, then theirs
        variants = [v for v in variants if v[0] in (("legacy", "nosplit") if args.plans else ("legacy",))]
    if tile_sweep:
        sweep = ([(32, 4, 2), (64, 4, 2)] if SMOKE else
                 [(32, 4, 3), (64, 4, 2), (64, 4, 4), (64, 8, 3), (128, 4, 2), (16, 4, 3)])
        if args.tiles:
            sweep = [tuple(int(v) for v in t.split(":")) for t in args.tiles.split(",")]
        for tile_n, warps, stages, *regs in sweep:   # TILE_N:WARPS:STAGES[:MAX_REGISTERS]
            legacy = args.tile_rule == "legacy"
            variants.append(((f"legacy_t{tile_n}" if legacy else f"chunk{args.chunk_keys}keys_t{tile_n}")
                             + f"w{warps}s{stages}" + (f"r{regs[0]}" if regs else ""),
                             args.tile_rule, 16 if legacy else max(1, args.chunk_keys // tile_n),
                             TileConfig(16, tile_n, warps, stages, regs[0] if regs else None)))
    for spec in filter(None, args.plans.split(",")):   # forced split plans (the batch-1 shapes)
        segs, per, tile_n, warps, stages, *short_lone = (int(v) for v in spec.split(":"))
        short, lone = short_lone or (0, 0)
        variants.append((f"plan{segs}x{per}_t{tile_n}w{warps}s{stages}" + (f"_s{short}l{lone}" if short_lone else ""),
                         "plan", SplitPlan(segs, per, short, lone), TileConfig(16, tile_n, warps, stages)))
    return variants


def stage_tail() -> None:
    """The decode attention kernel alone at the shapes of long64's and thr512's decode tails and
    of batch-1 decode (llama-8b heads, bf16, block 16, shuffled block tables): each split rule
    and tile shape captured G calls to a CUDA graph (disjoint copies of the batch where one
    is small, so the L2 holds none), microseconds a call, KV GB/s (K and V of every context
    read once) against PEAK_GBS, the split plan. Checks first: every variant against the fp32
    torch reference on a mixed-length batch under a graph-like bound, and each variant against
    the legacy rule at every shape (bf16 tolerance)."""
    from pagedserve.attention import split_plan as sp, triton_paged_attention as tpa
    from pagedserve.attention.paged_launch import narrow_decode_launch
    saved = (sp.SPLIT_RULE, sp.CHUNK_TILES, tpa.MERGE_IN_KERNEL)
    variants = _tail_variants(tile_sweep=not args.quick or bool(args.tiles), quick=args.quick)

    def run(b: Paged, out, bound: int, variant, lo: int = 0, n: int | None = None):
        _, rule, chunk, tiles = variant
        # "plan" passes its SplitPlan as num_splits below: the module's rule and chunk count stay as saved
        if rule != "plan":
            sp.SPLIT_RULE, sp.CHUNK_TILES = ("chunked" if rule in ("nosplit", "reduce") else rule), chunk
        tpa.MERGE_IN_KERNEL = saved[2] and rule != "reduce"
        try:
            n = len(b.query_lens) if n is None else n   # rows [lo, lo + n): one token each, so qsl[:n + 1]
            return paged_attention(b.query[lo:lo + n], b.k_cache, b.v_cache, b.block_tables[lo:lo + n],
                                   b.seq_lens[lo:lo + n], b.qsl[:n + 1], b.scale, 1, bound, num_decodes=n,
                                   out=out[lo:lo + n], tiles=tiles,
                                   num_splits=1 if rule == "nosplit" else chunk if rule == "plan" else None)
        finally:
            sp.SPLIT_RULE, sp.CHUNK_TILES, tpa.MERGE_IN_KERNEL = saved

    def plan(rows: int, bound: int, variant) -> str:
        _, rule, chunk, tiles = variant
        if rule == "nosplit":
            return "1"
        if rule == "plan":
            return f"{chunk.num_segments}x{chunk.tiles_per_segment}t"
        dtype = torch.float32 if SMOKE else torch.bfloat16
        narrow = None if tiles else narrow_decode_launch(rows, HKV, HQ // HKV, triton.next_power_of_2(D), 1,
                                                             bound, dtype, HQ, DEV)
        if narrow is not None:   # the launch paged_attention picks for it (32-key tiles)
            return f"{narrow[1].num_segments}x{narrow[1].tiles_per_segment}t_narrow"
        sp.SPLIT_RULE, sp.CHUNK_TILES = ("chunked" if rule == "reduce" else rule), chunk
        try:
            p = sp.choose_splits(rows, HKV, 1, bound, (tiles.tile_n if tiles else 64 if not SMOKE else 32),
                                 sp.sm_count(DEV), HQ, triton.next_power_of_2(D))
        finally:
            sp.SPLIT_RULE, sp.CHUNK_TILES, tpa.MERGE_IN_KERNEL = saved
        return f"{p.num_segments}x{p.tiles_per_segment}t" if p.num_segments > 1 else "1"

    # correctness: mixed lengths under a graph-like bound, every variant against the fp32 reference
    check = _tail_batch(6 if SMOKE else 48, 20 if SMOKE else 100, 400 if SMOKE else 5000, 1, seed=31)
    ref = check.reference_fp32()
    bound = 1024 if SMOKE else 32768
    bad = []
    for variant in variants:
        got = run(check, torch.full_like(check.query, float("nan")), bound, variant)
        err = float((got.float() - ref).abs().max())
        ok = math.isfinite(err) and err <= (2e-4 if SMOKE else 3e-2)
        emit(stage="tail_check", variant=variant[0], plan=plan(len(check.query_lens), bound, variant),
             max_abs_err_vs_fp32_ref=err, passed=ok)
        if not ok:
            bad.append(variant[0])
    if bad:
        raise RuntimeError(f"tail variants wrong against the reference: {bad}")
    del check, ref

    rows_out = []
    shapes = TAIL_SMOKE_SHAPES if SMOKE else TAIL_SHAPES
    if args.quick and not SMOKE:
        shapes = [s for s in shapes if s[0] in ("long35", "long35_even", "thr512_400", "thr256_600", "long16",
                                                "b1_128", "b1_400", "b1_4k")]
    if args.shapes:
        shapes = [s for s in TAIL_SHAPES if s[0] in args.shapes.split(",")]
    for label, rows, lo, hi, bound in shapes:
        per_call = rows * (lo + hi) // 2 * HKV * D * 2 * 2
        copies = 1 if SMOKE else max(1, min(64, -(-(256 << 20) // per_call)))
        calls = max(copies, 1 if SMOKE else 4)
        b = _tail_batch(rows, lo, hi, copies, seed=rows)
        kv_bytes = sum(c + 1 for c in b.context_lens[:rows]) * HKV * D * 2 * b.k_cache.element_size()
        out = torch.empty_like(b.query)
        baseline = None
        for variant in (variants if rows > 1 or SMOKE else
                        [v for v in variants if v[0] in ("legacy", "chunk32", "chunk32_reduce", "nosplit") or v[1] == "plan"]):
            try:
                got = run(b, out, bound, variant, 0, rows).clone()   # compiles; the check
                if baseline is None:
                    baseline = got
                diff = float((got.float() - baseline.float()).abs().max())
                if SMOKE:
                    ms = bench_ms(lambda: run(b, out, bound, variant, 0, rows))
                else:
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for i in range(calls):
                            run(b, out, bound, variant, (i % copies) * rows, rows)
                    ms = bench_ms(graph.replay) / calls
                    del graph
                us = ms * 1e3
                gbs = kv_bytes / (us * 1e-6) / 1e9
                result = dict(stage="tail", shape=label, rows=rows, context=[lo, hi], bound=bound,
                              variant=variant[0], plan=plan(rows, bound, variant), us=round(us, 2),
                              kv_gb_s=round(gbs, 1), of_peak=round(gbs / PEAK_GBS, 3),
                              max_abs_vs_first=diff, diff_ok=diff <= (2e-4 if SMOKE else 3e-2))
            except Exception as exc:   # e.g. a tile shape out of shared memory
                result = dict(stage="tail", shape=label, variant=variant[0], failed=f"{type(exc).__name__}: {str(exc)[:160]}")
            emit(**result)
            rows_out.append(result)
        b = out = baseline = None   # freed before the next shape
        if not SMOKE:
            torch.cuda.empty_cache()
    print(f"\n{'shape':<14} {'variant':<30} {'plan':<10} {'us':>9} {'GB/s':>8} {'of peak':>8}")
    for r in rows_out:
        if "failed" in r:
            print(f"{r['shape']:<14} {r['variant']:<30} FAILED {r['failed']}")
        else:
            print(f"{r['shape']:<14} {r['variant']:<30} {r['plan']:<10} {r['us']:9.1f} {r['kv_gb_s']:8.0f} "
                  f"{r['of_peak']:8.2f}{'' if r['diff_ok'] else '  MISMATCH'}")
    best = {}
    for r in rows_out:
        if "failed" not in r and (r["shape"] not in best or r["us"] < best[r["shape"]]["us"]):
            best[r["shape"]] = r
    for shape, r in best.items():
        legacy = next((x for x in rows_out if x["shape"] == shape and x.get("variant") == "legacy" and "us" in x), None)
        emit(stage="tail_best", shape=shape, variant=r["variant"], us=r["us"], kv_gb_s=r["kv_gb_s"],
             legacy_us=legacy["us"] if legacy else None)
