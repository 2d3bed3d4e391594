"""Batch-1 decode on the GPU (issue 22): where one decode step's time goes and how fast the
matmuls stream their weights. One run, stages in the order check, attn, models, sweep,
bf16, tests (each guarded: a failure prints its traceback and the next stage runs):

  check   the fused decode kernels against the unfused ones at the models' shapes, bf16:
          SiLU-and-mul -> down gemv and rotary -> KV store bit for bit; argmax_rows against torch's
  attn    per-layer decode attention (rotary_store_kv + the paged kernel + its reduce) timed in
          CUDA graphs (bs 1 at contexts 128-2048, bs 4 and 16; at bs 1 also from a flushed L2);
          the greedy argmax over 128k logits (1 and 16 rows): torch's against argmax_rows
  sweep   (not by default) M=1 matmuls of llama-1b / llama-8b (qkv, o, gate_up, down with its
          SiLU prologue, lm_head): cuBLAS against the Triton gemv over a grid of launch shapes
          (sweep_configs), each launch checked first (check_launches), weights
          cycled past the L2, each call timed in a CUDA graph of 40. Prints a CONFIGS table and
          keeps it for the variant "swept" (then it runs before models).
          --roles qkv,o,...: only those matmuls, over QUICK_CONFIGS (~30 s)
  models  per model and --variants (default: the library's defaults; swept: with the sweep's
          gemv table; default2: the defaults again; old: session 8's gemv table; base: torch's argmax and
          one pageable copy per step input; unfused: no gemv prologue, no rotary in the KV store;
          the RMSNorm-prologue gemv, the one-launch decode attention, PDL launches and the
          RMSNorm in the o / down gemv's tail that earlier runs A/B'd are deleted): b1_decode tok/s as
          ../shared/bench/peers.py measures it (128-token prompt, 256 greedy tokens, warmed
          once), the decode graph's replay time
          (bs=1, context ~384), a torch.profiler table of one replay (per kernel calls, us,
          bytes moved, GB/s), a CPU + CUDA profile of a 33-token generate (per step: wall, device
          busy, the device work beside the graph, the host's top ops), and for --thr models
          peers' thr512 on the same engine
  bf16    (not by default) benchmarks/bf16_agreement.py (needs the default model's GGUF: see
          gpu_check.sh)
  tests   (not by default) the kernel tests of these kernels on the GPU, bf16 included

Usage (repo root, PYTHONPATH=$PWD; peers.py in .devcarry/, .. or ../shared/bench/):
  python3 benchmarks/decode_gpu.py [--stages check,attn,models] [--models llama-1b,llama-8b]
                                   [--variants default,base,unfused] [--thr llama-1b] [--cpu-smoke]
About 120 s on an H200 with a cold Triton cache (+ ~60 s with tests). Writes decode_gpu.json
(and bf16 json) under $OUT when set. --cpu-smoke runs every stage on a tiny model and tiny
shapes on the CPU (Triton's interpreter) to prove the script, not to measure."""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# peers.py: .devcarry/ (repo root), .. (a copy under .devcarry/NAME/), or ../shared/bench
sys.path[:0] = [".devcarry", os.path.abspath(".."),
                os.path.join(os.path.dirname(os.path.abspath(".")), "shared", "bench")]

os.environ.setdefault("PAGEDSERVE_COMPILE_AHEAD_STRICT", "1")   # a failed compile-ahead fails the run
from pagedserve.layers import linear_ops  # noqa: E402
from pagedserve.layers.triton_gemv import GemvConfig, config_for, gemv, silu_and_mul_gemv  # noqa: E402

MAX_MODEL_LEN = 2048   # peers.py's: the decode graphs' attention is launched for it
HBM_TB_S = 4.3   # the bandwidth basis for the ceilings (~287 / ~1,740 tok/s)
SHAPES = {  # model: dict(hidden, intermediate, layers, heads, kv_heads, vocab)
    "llama-1b": dict(h=2048, i=8192, layers=16, heads=32, kv=8, vocab=128256),
    "llama-8b": dict(h=4096, i=14336, layers=32, heads=32, kv=8, vocab=128256),
    "tiny": dict(h=64, i=128, layers=2, heads=4, kv=2, vocab=512),
}
TIED = {"llama-1b": True, "llama-8b": False, "tiny": True}
RESULTS: dict = {"date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())}


def log(msg: str) -> None:
    print(msg, flush=True)


def stage(name):
    def wrap(fn):
        def run(*args, **kwargs):
            t0 = time.time()
            log(f"=== {name}")
            try:
                fn(*args, **kwargs)
            except Exception:   # one stage's failure must not cost the others' device time
                traceback.print_exc()
                RESULTS.setdefault("failed", []).append(name)
            log(f"=== {name} done in {time.time() - t0:.1f} s")
        return run
    return wrap


def weight_shapes(model: str) -> dict[str, tuple[int, int]]:
    s = SHAPES[model]
    d = s["h"] // s["heads"]
    return {"qkv": ((s["heads"] + 2 * s["kv"]) * d, s["h"]), "o": (s["h"], s["heads"] * d),
            "gate_up": (2 * s["i"], s["h"]), "down": (s["h"], s["i"]), "lm_head": (s["vocab"], s["h"])}


# ----------------------------------------------------------------------------- timing helpers
def time_us(fn, args_list) -> float:
    """Per-call microseconds of fn(*args) cycling over args_list, in a CUDA graph of 40 calls
    (gemv_sweep.py's timer: host launch cost excluded, as in the decode graphs); on CPU one
    eager call."""
    if SMOKE:
        t0 = time.perf_counter()
        fn(*args_list[0])
        return (time.perf_counter() - t0) * 1e6
    from gemv_sweep import time_us as graph_time_us
    return graph_time_us(lambda args: fn(*args), args_list)


ROLES: list[str] = []   # --roles: the sweep's matmuls (all when empty), over QUICK_CONFIGS
# launch shapes around the current ones, and the narrow slabs (more programs) and whole-K slices
# (every load of a program issued at once) that the small-N matmuls (qkv, o) may want
QUICK_CONFIGS = [GemvConfig(*c) for c in (
    (8, 512, 4, 4), (16, 256, 4, 4), (8, 1024, 4, 4), (16, 512, 4, 4), (4, 1024, 4, 4), (4, 2048, 4, 2),
    (2, 2048, 4, 2), (4, 512, 4, 4), (8, 2048, 4, 2), (8, 512, 8, 4), (8, 256, 4, 4), (4, 1024, 2, 4),
    (8, 512, 2, 4), (16, 1024, 4, 4), (8, 1024, 4, 2))]


def sweep_configs(n: int, k: int) -> list[GemvConfig]:
    """M = 1 launch shapes (the FMA variant: block_n may be below 16) for weight [n, k]: tiles
    around the table's, narrower ones for the narrow matmuls. (Split K, summed in the same
    launch by each tile's last program, lost on all ten llama shapes by 0.8-6.1 us a call:
    benchmarks/RESULTS.md, session 9.)"""
    if SMOKE:
        return [GemvConfig(16, 64, 4, 2), GemvConfig(8, 64, 4, 2), GemvConfig(8, 32, 4, 2)]
    if ROLES:
        return QUICK_CONFIGS
    tiles = ((4, 512), (4, 1024), (8, 256), (8, 512), (8, 1024), (16, 256), (16, 512), (32, 256))
    tiles += () if n >= 16384 else ((2, 1024), (4, 256))   # narrower slabs: more programs
    return [GemvConfig(bn, bk, w, st) for bn, bk in tiles for w, st in ((4, 4), (4, 3), (8, 4)) if bk <= k]


SWEPT: dict[tuple[int, int], GemvConfig] = {}   # the sweep's best launch per weight shape (variant "swept")


# ----------------------------------------------------------------------------- stages
@stage("check")
def check(dev: torch.device, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    from pagedserve.attention.torch_ref import store_kv_ref
    from pagedserve.attention.triton_store_kv import rotary_store_kv
    from pagedserve.layers import triton_ops
    from pagedserve.layers.rotary import RotaryEmbedding
    out = RESULTS.setdefault("check", {})
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(dev, dtype)  # noqa: E731
    for model in (["tiny"] if SMOKE else ["llama-1b", "llama-8b"]):
        shapes, s = weight_shapes(model), SHAPES[model]
        fma = GemvConfig(16, 64, 4, 2) if SMOKE else None
        gate_up = rnd(1, 2 * s["i"])
        w_down = rnd(*shapes["down"], scale=0.02)
        ref = gemv(triton_ops.silu_and_mul(gate_up), w_down, fma)
        out[f"{model}.silu_down_equal"] = bool(torch.equal(silu_and_mul_gemv(gate_up, w_down, fma), ref))
        d = s["h"] // s["heads"]
        rope = RotaryEmbedding(d, 4096, 500000.0, dtype=dtype).to(dev)
        qkv = rnd(3, (s["heads"] + 2 * s["kv"]) * d)
        q, k, v = qkv.split([s["heads"] * d, s["kv"] * d, s["kv"] * d], dim=-1)
        q, k, v = (t.reshape(3, -1, d) for t in (q, k, v))
        caches = [rnd(8, 16, s["kv"], d) for _ in range(2)]
        ref_caches = [c.clone() for c in caches]
        pos = torch.tensor([5, 300, 4000], device=dev)
        slots = torch.tensor([7, -1, 100], device=dev)
        q2, k2 = q.clone(), k.clone()
        triton_ops.rotary_in_place(pos, q2, k2, rope.cos_cache, rope.sin_cache)
        store_kv_ref(k2, v, *ref_caches, slots)
        rotary_store_kv(pos, q, k, v, rope.cos_cache, rope.sin_cache, *caches, slots)
        out[f"{model}.rotary_store_equal"] = bool(torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(
            caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1]))
    for rows in (1, 16, 512):   # the greedy sampler's argmax against torch's, bit for bit
        logits = torch.randn(rows, 512 if SMOKE else 128256, device=dev).to(dtype)
        logits[:, 100] = logits[:, 7] = logits.max() + 1   # a tie: the first index wins
        out[f"argmax_rows{rows}_equal"] = bool(torch.equal(triton_ops.argmax_rows(logits), logits.argmax(dim=-1)))
    log(json.dumps(out))


def decode_case(model: str, dev: torch.device, dtype: torch.dtype, rnd, bs: int, ctx: int, copies: int = 1) -> dict:
    """A decode batch of `bs` sequences at context `ctx` (the new token included) over a paged cache
    of `copies` disjoint block sets (one per timed call: not all L2-resident)."""
    s = SHAPES[model]
    d = s["h"] // s["heads"]
    blocks = -(-ctx // 16)
    num_blocks = blocks * bs * copies + 1
    perm = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(ctx)).to(dev, torch.int32) + 1
    tables = perm.view(copies, bs, blocks)
    qkv = rnd(bs, (s["heads"] + 2 * s["kv"]) * d)
    q, k, v = qkv.split([s["heads"] * d, s["kv"] * d, s["kv"] * d], dim=-1)
    seq_lens = torch.full((bs,), ctx, dtype=torch.int32, device=dev)
    last = tables[:, :, (ctx - 1) // 16].long() * 16 + (ctx - 1) % 16   # [copies, bs] slots of the new tokens
    return dict(qkv=qkv, q=q.view(bs, -1, d), k=k.view(bs, -1, d), v=v.view(bs, -1, d), tables=tables,
                seq_lens=seq_lens, qsl=torch.arange(bs + 1, dtype=torch.int32, device=dev), slots=last,
                positions=torch.full((bs,), ctx - 1, device=dev), scale=d ** -0.5,   # caches drawn on the device
                k_cache=torch.randn(num_blocks, 16, s["kv"], d, device=dev).to(dtype),
                v_cache=torch.randn(num_blocks, 16, s["kv"], d, device=dev).to(dtype))


def generic_decode(c: dict, rope, copy: int = 0, clone: bool = True) -> torch.Tensor:
    """What main launches per layer: rotary_store_kv, the paged kernel (+ its split-K reduce);
    clone=False (timing) rotates the case's q and k in place."""
    from pagedserve.attention.triton_paged_attention import paged_attention
    from pagedserve.attention.triton_store_kv import rotary_store_kv
    q, k = (c["q"].clone(), c["k"].clone()) if clone else (c["q"], c["k"])
    rotary_store_kv(c["positions"], q, k, c["v"], rope.cos_cache, rope.sin_cache, c["k_cache"], c["v_cache"],
                    c["slots"][copy])
    return paged_attention(q, c["k_cache"], c["v_cache"], c["tables"][copy], c["seq_lens"], c["qsl"], c["scale"],
                           1, MAX_MODEL_LEN, num_decodes=q.shape[0])


def cold_time_us(fn, dev: torch.device, calls: int = 20) -> float:
    """Microseconds of fn() after the L2 is flushed (a 256 MiB fill before each call), in a CUDA
    graph, less the fills' own time (a graph of the fills alone); on CPU one eager call."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return round((time.perf_counter() - t0) * 1e6, 2)
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)

    def graph_us(body) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                body()
        graph.replay()
        best = float("inf")
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) * 1e3 / calls)
        return best
    both = graph_us(lambda: (flush.fill_(1), fn()))
    alone = graph_us(lambda: flush.fill_(1))
    return round(both - alone, 2)


@stage("attn")
def attn_stage(dev: torch.device, dtype: torch.dtype, models: list[str]) -> None:
    """Per-layer decode attention, timed in CUDA graphs of 40 calls (16 disjoint caches, mostly
    L2-resident): rotary_store_kv + paged kernel + reduce; at bs 1 also with the L2 flushed
    before each call (cold_*: the cache from HBM, as a model's layers meet it)."""
    from pagedserve.layers.rotary import RotaryEmbedding
    rows = []
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(dev, dtype)  # noqa: E731
    cases = ((1, 100),) if SMOKE else ((1, 128), (1, 384), (1, 1024), (1, 2048), (4, 384), (16, 512))
    for model in (["tiny"] if SMOKE else models):
        d = SHAPES[model]["h"] // SHAPES[model]["heads"]
        rope = RotaryEmbedding(d, 4096, 500000.0, dtype=dtype).to(dev)
        for bs, ctx in cases:
            copies = 1 if SMOKE else 16
            c = decode_case(model, dev, dtype, rnd, bs, ctx, copies)
            row = dict(model=model, bs=bs, ctx=ctx,
                       generic_us=round(time_us(lambda i: generic_decode(c, rope, i, False),
                                                [(i,) for i in range(copies)]), 2))
            if bs == 1:   # as in the model: the cache read from HBM, not the L2
                row["cold_generic_us"] = cold_time_us(lambda: generic_decode(c, rope, 0, False), dev)
            rows.append(row)
            log(json.dumps(row))
    for n_rows in (1, 16):   # the greedy sampler's argmax over a 128k vocabulary
        logits = [torch.randn(n_rows, 512 if SMOKE else 128256, device=dev).to(dtype) for _ in range(4)]
        from pagedserve.layers.triton_ops import argmax_rows
        row = dict(argmax_rows=n_rows, torch_us=round(time_us(lambda x: x.argmax(dim=-1), [(x,) for x in logits]), 2),
                   triton_us=round(time_us(argmax_rows, [(x,) for x in logits]), 2))
        rows.append(row)
        log(json.dumps(row))
    RESULTS["attn"] = rows


def check_launches(run, x: torch.Tensor, weights: list, refs: list, cfg: GemvConfig) -> str | None:
    """None if `run(x, w, cfg)` is within bf16 rounding of the fp32 reference (refs) on each weight,
    launched back to back over all of them twice (a launch reading state another left would
    show another weight's values), and the same bits both times; else what failed."""
    outs = [[run(x, w, cfg) for w in weights] for _ in range(2)]
    for i, ref in enumerate(refs):
        err = (outs[0][i].float() - ref).abs()
        bad = (err > ref.abs() * 2.0 ** -7 + 1e-3 * ref.abs().max()).sum().item()
        if bad:
            return f"weight {i}: {bad} outputs off (max err {err.max().item():.3g})"
        if not torch.equal(outs[0][i], outs[1][i]):
            return f"weight {i}: two launches differ"
    return None


@stage("sweep")
def sweep(dev: torch.device, dtype: torch.dtype, models: list[str]) -> None:
    """Every launch shape of sweep_configs, compiled ahead in parallel, checked (check_launches;
    down with its SiLU-and-mul prologue, as the model runs it, also bit for bit the unfused
    activation then the same launch), then timed on weights cycled past the L2 in CUDA graphs;
    the same bits again after the timing. Fills SWEPT."""
    from pagedserve.layers import triton_ops
    from pagedserve.worker.compile_ahead import compile_ahead
    rows, best = [], {}
    failed: list[str] = []
    for model in (["tiny"] if SMOKE else models):
        for role, (n, k) in weight_shapes(model).items():
            if ROLES and role not in ROLES:
                continue
            configs = sweep_configs(n, k)
            nbytes = n * k * 2
            copies = 1 if SMOKE else max(3, -(-600 * 2**20 // nbytes))
            weights = [(torch.randn(n, k, device=dev) * 0.02).to(dtype) for _ in range(copies)]
            x = torch.randn(1, 2 * k if role == "down" else k, device=dev).to(dtype)
            act = triton_ops.silu_and_mul(x) if role == "down" else x
            run = silu_and_mul_gemv if role == "down" else gemv
            refs = [act.float() @ w.float().T for w in weights[:3]]
            if not SMOKE:
                try:
                    compile_ahead(lambda w0=weights[0]: [run(x, w0, c) for c in configs])
                except Exception as exc:   # each launch then compiles (or fails) on its own
                    log(f"  compile_ahead: {type(exc).__name__}: {str(exc)[:200]}")
            cublas = time_us(lambda w: torch.nn.functional.linear(act, w), [(w,) for w in weights])
            timed = []
            for cfg in configs:
                try:
                    why = check_launches(run, x, weights[:3], refs, cfg)
                    if why is None and role == "down" and not torch.equal(run(x, weights[0], cfg),
                                                                          gemv(act, weights[0], cfg)):
                        why = "the SiLU prologue differs from the activation kernel then the gemv"
                    if why is None:
                        first = run(x, weights[0], cfg)
                        us = time_us(lambda w, c=cfg: run(x, w, c), [(w,) for w in weights])
                        if not torch.equal(run(x, weights[0], cfg), first):
                            why = "bits differ after the timed graph replays"
                    if why is not None:
                        failed.append(f"{model}.{role} {cfg}: {why}")
                        log(f"  CHECK FAILED {failed[-1]}")
                        continue
                    timed.append((us, cfg))
                except Exception as exc:   # e.g. out of shared memory / registers for a big tile
                    log(f"  {model}.{role} {cfg}: {type(exc).__name__}: {str(exc)[:100]}")
            timed.sort(key=lambda t: t[0])
            cur = config_for(1, n, k)
            cur_us = time_us(lambda w: run(x, w, cur), [(w,) for w in weights])
            row = dict(shape=f"{model}.{role}", n=n, k=k, mbytes=round(nbytes / 2**20, 1),
                       cublas_us=round(cublas, 2), cublas_tb_s=round(nbytes / cublas / 1e6, 2),
                       current_us=round(cur_us, 2), current_tb_s=round(nbytes / cur_us / 1e6, 2),
                       best_us=round(timed[0][0], 2), best_tb_s=round(nbytes / timed[0][0] / 1e6, 2),
                       best=timed[0][1].__dict__,
                       top5=[(round(t, 2), c.__dict__) for t, c in timed[:5]], configs=len(configs),
                       all=[(round(t, 2), list(c.__dict__.values())) for t, c in timed])
            best[(n, k)] = (timed[0][1], timed[0][0] < cublas)
            SWEPT[(n, k)] = timed[0][1]
            rows.append(row)
            log(f"{row['shape']:16s} {row['mbytes']:7.1f} MiB  cuBLAS {cublas:8.2f} us ({row['cublas_tb_s']:.2f} TB/s)"
                f"  current {cur_us:8.2f} ({row['current_tb_s']:.2f})  best {timed[0][0]:8.2f} "
                f"({row['best_tb_s']:.2f}) {timed[0][1]}")
            del weights
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    RESULTS["sweep"] = rows
    RESULTS["sweep_check_failed"] = failed
    log(f"CHECK_SUMMARY failed={len(failed)} of {sum(r['configs'] for r in rows)} launches")
    log("CONFIGS = {  # the best launch shape per weight shape; # cuBLAS: where cuBLAS was faster\n" + "\n".join(
        f"    ({n}, {k}): GemvConfig({c.block_n}, {c.block_k}, {c.num_warps}, {c.num_stages}),"
        + ("" if wins else "  # cuBLAS") for (n, k), (c, wins) in best.items()) + "\n}")


def kernel_kind(name: str) -> str:
    low = name.lower()
    for key, kind in (("_gemv_kernel", "gemv"), ("rotary_store", "rotary_store_kv"), ("rotary", "rotary"),
                      ("store_kv", "store_kv"), ("rms_norm", "rms_norm"), ("silu", "silu_and_mul"),
                      ("splitkreduce", "cublas_reduce"), ("decode_attention", "attention"), ("paged_attention", "attention"), ("attn", "attention"),
                      ("reduce", "attention_reduce"), ("gemm", "cublas"), ("gemv", "cublas"), ("nvjet", "cublas"),
                      ("xmma", "cublas"), ("cutlass", "cublas"), ("index", "embedding"), ("embedding", "embedding")):
        if key in low:
            return kind
    return "other"


def bytes_of(kind: str, model: str, ctx: int) -> int:
    s = SHAPES[model]
    d = s["h"] // s["heads"]
    kv_row = s["kv"] * d * 2
    return {"rms_norm": 5 * s["h"] * 2, "silu_and_mul": 3 * s["i"] * 2, "rotary": 2 * (s["heads"] * d * 2 + kv_row),
            "store_kv": 4 * kv_row, "rotary_store_kv": 2 * s["heads"] * d * 2 + 4 * kv_row,
            "attention": 2 * ctx * kv_row + 2 * s["heads"] * d * 2, "embedding": 2 * s["h"] * 2}.get(kind, 0)


def profile_replay(graph, model: str, ctx: int, replays: int = 5) -> dict:
    """torch.profiler over `replays` replays of the bs=1 decode graph: per kernel (role for
    the matmuls, by order: qkv, o, gate_up, down per layer, then the LM head) calls, us,
    bytes and GB/s per replay."""
    from torch.profiler import ProfilerActivity, profile
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()),
                     key=lambda e: e.time_range.start)
    if not kernels:
        log("profiler saw no kernels in the graph replay")
        return {}
    return kernel_table(kernels, model, ctx, replays)


def kernel_table(kernels: list, model: str, ctx: int, replays: int) -> dict:
    """The table of profiler kernel events (in launch order) of `replays` decode steps."""
    layers, shapes = SHAPES[model]["layers"], weight_shapes(model)
    matmuls = [e for e in kernels if kernel_kind(e.name) in ("gemv", "cublas")]
    per_replay = len(matmuls) // replays
    roles_ok = per_replay == 4 * layers + 1 and len(matmuls) % replays == 0
    if not roles_ok:
        log(f"matmul kernels per replay {per_replay} != 4 * layers + 1: bytes of matmuls not attributed")
    roles = {}
    if roles_ok:
        for i, e in enumerate(matmuls):
            j = i % per_replay
            roles[id(e)] = "lm_head" if j == 4 * layers else ("qkv", "o", "gate_up", "down")[j % 4]
    table: dict[str, dict] = {}
    for e in kernels:
        kind = kernel_kind(e.name)
        role = roles.get(id(e))
        key = f"{kind}:{role}" if role else kind
        nbytes = shapes[role][0] * shapes[role][1] * 2 if role else bytes_of(kind, model, ctx)
        row = table.setdefault(key, dict(calls=0, us=0.0, bytes=0, names=set()))
        row["calls"] += 1
        row["us"] += e.time_range.elapsed_us()
        row["bytes"] += nbytes
        row["names"].add(e.name[:60])
    out = {}
    total_us = sum(r["us"] for r in table.values()) / replays
    total_bytes = sum(r["bytes"] for r in table.values()) / replays
    log(f"{'kernel':26s} {'calls':>6s} {'us':>9s} {'%':>6s} {'MB':>9s} {'GB/s':>8s}  names")
    for key, r in sorted(table.items(), key=lambda kv: -kv[1]["us"]):
        us, nbytes = r["us"] / replays, r["bytes"] / replays
        gbs = nbytes / us / 1e3 if us and nbytes else None
        out[key] = dict(calls=r["calls"] // replays, us=round(us, 1), mb=round(nbytes / 1e6, 3),
                        gb_s=round(gbs) if gbs else None, names=sorted(r["names"]))
        log(f"{key:26s} {r['calls'] // replays:6d} {us:9.1f} {100 * us / total_us:5.1f}% {nbytes / 1e6:9.2f} "
            f"{gbs or 0:8.0f}  {', '.join(sorted(r['names']))[:90]}")
    log(f"{'total (kernels)':26s} {len(kernels) // replays:6d} {total_us:9.1f} 100.0% {total_bytes / 1e6:9.2f} "
        f"{total_bytes / total_us / 1e3:8.0f}   floor at {HBM_TB_S} TB/s: {total_bytes / HBM_TB_S / 1e6:.1f} us")
    return dict(kernels=out, kernel_us=round(total_us, 1), launches=len(kernels) // replays,
                mbytes=round(total_bytes / 1e6, 1), floor_us=round(total_bytes / HBM_TB_S / 1e6, 1))


VARIANTS = {   # name: (gemv fusions, packed step inputs + Triton argmax)
    "default": (True, True), "base": (True, False), "unfused": (False, False),
    # the library's defaults with the gemv table updated by this run's sweep (SWEPT), and the
    # defaults once more after it (the drift between two runs of one engine)
    "swept": (True, True), "default2": (True, True), "old": (True, True)}
# variant "old": the one-row table before session 9's sweep (session 8's CONFIGS)
OLD_CONFIGS = {(n, k): GemvConfig(*c) for (n, k), c in {
    (3072, 2048): (8, 512, 4, 4), (2048, 2048): (8, 512, 4, 4), (16384, 2048): (8, 1024, 4, 4),
    (2048, 8192): (8, 1024, 4, 4), (128256, 2048): (16, 256, 4, 4), (6144, 4096): (16, 256, 4, 4),
    (4096, 4096): (8, 512, 4, 4), (28672, 4096): (16, 256, 4, 4), (4096, 14336): (16, 512, 4, 4),
    (128256, 4096): (8, 1024, 4, 4)}.items()}


DEFAULT_FUSION = linear_ops.FUSE_DECODE


@stage("models")
def models_stage(dev: torch.device, models: list[str], ab: list[str], variants: list[str], thr: list[str]) -> None:
    for model in (["tiny"] if SMOKE else models):
        for variant in (variants if model in ab or (SMOKE and ab) else variants[:1]):
            try:
                run_model(dev, model, variant, variant != "unfused" and (model in thr or (SMOKE and bool(thr))))
            except Exception:   # the other variants still run
                traceback.print_exc()
                RESULTS.setdefault("failed", []).append(f"{model}.{variant}")
            finally:
                linear_ops.set_decode_fusion(DEFAULT_FUSION)
                from pagedserve.layers import sampler
                from pagedserve.worker import input_batch
                input_batch.PACK_STEP_INPUTS = sampler.TRITON_GREEDY = True


def model_dir(model: str) -> str:
    """peers.py's dummy config folder (its make_model_dir); where peers.py is not at hand, the
    same config from SHAPES."""
    if model != "tiny":
        try:
            from peers import make_model_dir
            return make_model_dir(model)
        except ImportError:
            log("peers.py not found (.devcarry/ or ../shared/bench/): writing the config from SHAPES")
    d = f"/tmp/models/decode_gpu_{model}"
    os.makedirs(d, exist_ok=True)
    s = SHAPES[model]
    json.dump(dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=s["vocab"],
                   hidden_size=s["h"], intermediate_size=s["i"], num_hidden_layers=s["layers"],
                   num_attention_heads=s["heads"], num_key_value_heads=s["kv"], max_position_embeddings=4096,
                   rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu", torch_dtype="bfloat16",
                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=TIED[model]), open(f"{d}/config.json", "w"))
    return d


def run_model(dev: torch.device, model: str, variant: str, thr512: bool) -> None:
    label = f"{model}.{variant}"
    gemv_fusion, packed_inputs = VARIANTS[variant]
    from pagedserve.layers import triton_gemv
    table = dict(triton_gemv.CONFIGS)
    if variant == "swept":
        if not SWEPT:
            raise RuntimeError("variant swept needs the sweep stage first (--stages sweep,models)")
        triton_gemv.CONFIGS.update(SWEPT)
        res_table = {f"{n}x{k}": list(c.__dict__.values()) for (n, k), c in SWEPT.items()}
        log(f"{label}: gemv table {res_table}")
    elif variant == "old":
        triton_gemv.CONFIGS.update(OLD_CONFIGS)
    try:
        run_engine(dev, model, variant, thr512, label, gemv_fusion, packed_inputs)
    finally:
        triton_gemv.CONFIGS.clear()
        triton_gemv.CONFIGS.update(table)


def run_engine(dev: torch.device, model: str, variant: str, thr512: bool, label: str, gemv_fusion: bool,
               packed_inputs: bool) -> None:
    from pagedserve import LLM, SamplingParams
    from pagedserve.layers import sampler
    from pagedserve.worker import input_batch
    linear_ops.set_decode_fusion(gemv_fusion)
    input_batch.PACK_STEP_INPUTS = sampler.TRITON_GREEDY = packed_inputs
    t0 = time.time()
    kwargs = dict(device="cpu", dtype="float32", max_model_len=512) if SMOKE else \
        dict(dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.85)
    llm = LLM(model=model_dir(model), load_format="dummy", skip_tokenizer_init=True, seed=0, **kwargs)
    res = dict(ready_s=round(time.time() - t0, 1))
    new = 16 if SMOKE else 256
    prompt = {"prompt_token_ids": list(range(100, 228))}
    sp = SamplingParams(max_tokens=new, ignore_eos=True, temperature=0.0, detokenize=False)
    first = llm.generate([prompt], [sp], use_tqdm=False)
    t0 = time.time()
    second = llm.generate([prompt], [sp], use_tqdm=False)
    dt = time.time() - t0
    res["b1_decode_tok_s"] = round(new / dt, 1)
    res["same_ids_twice"] = first[0].outputs[0].token_ids == second[0].outputs[0].token_ids
    res["first_ids"] = list(second[0].outputs[0].token_ids[:8])
    res["ids"] = list(second[0].outputs[0].token_ids)
    graphs = llm.engine.core.executor.runner.graph_runner
    if graphs is not None:
        ctx = int(graphs.seq_lens[0].item())
        graph = graphs.graphs[1]
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        end.synchronize()
        res["replay_ms"] = round(start.elapsed_time(end) / 50, 3)
        res["host_gap_ms"] = round(dt * 1e3 / new - res["replay_ms"], 3)   # per token, beside the replay
        res["context"] = ctx
        log(f"{label}: b1_decode {res['b1_decode_tok_s']} tok/s, replay {res['replay_ms']} ms "
            f"({1e3 / res['replay_ms']:.0f} tok/s if the host were free), context {ctx}")
        res["profile"] = profile_replay(graph, model, ctx)
    else:   # the CPU smoke run: the table code on made-up kernel events
        log(f"{label}: b1_decode {res['b1_decode_tok_s']} tok/s (no CUDA graphs here)")
        from types import SimpleNamespace
        names = ["index_select"] + ["_gemv_kernel", "_rotary_store_kv_kernel", "_paged_attention_kernel",
                                    "nvjet_tst_64x8", "_gemv_kernel", "_gemv_kernel"] * SHAPES[model]["layers"] \
            + ["_gemv_kernel", "argmax"]
        fake = [SimpleNamespace(name=n, time_range=SimpleNamespace(start=i, elapsed_us=lambda: 2.0))
                for i, n in enumerate(names * 2)]
        res["profile"] = kernel_table(fake, model, 200, 2)
    res["steps"] = profile_steps(llm, prompt, res.get("profile", {}))
    if thr512:
        res["thr512"] = run_thr512(llm)
    RESULTS.setdefault("models", {})[label] = res
    if variant != "default" and f"{model}.default" in RESULTS["models"]:   # dummy weights: an ulp may flip a tie
        base = RESULTS["models"][f"{model}.default"]
        same = base["first_ids"] == res["first_ids"]
        prefix = next((i for i, (a, b) in enumerate(zip(base["ids"], res["ids"])) if a != b), len(res["ids"]))
        log(f"{model}: default and {variant} first ids equal: {same}; greedy ids equal for the first "
            f"{prefix} of {len(res['ids'])}")
        res["ids_equal_prefix_vs_default"] = prefix
    log(json.dumps({k: v for k, v in res.items() if k not in ("profile", "ids")}))
    llm.shutdown()
    del llm, graphs
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def profile_steps(llm, prompt: dict, replay: dict, tokens: int = 33) -> dict:
    """torch.profiler (CPU + CUDA) over one generate of `tokens` greedy tokens: per decode step
    the wall time, the device's busy time, what ran on the device beside the graph replay
    (copies, sampling: kernel names not in the replay's table) and the host's top ops."""
    from torch.profiler import ProfilerActivity, profile
    from pagedserve import SamplingParams
    sp = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0, detokenize=False)
    cuda = dev_is_cuda()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    llm.generate([prompt], [sp], use_tqdm=False)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        llm.generate([prompt], [sp], use_tqdm=False)
        wall_ms = (time.perf_counter() - t0) * 1e3
    steps = tokens   # one prefill step (prefix-cached prompt) + tokens - 1 decode steps
    graph_names = {n for row in replay.get("kernels", {}).values() for n in row["names"]}
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.time_range.elapsed_us() for e in device_events) / 1e3
    beside: dict[str, list] = {}
    for e in device_events:
        if e.name[:60] not in graph_names:
            row = beside.setdefault(e.name[:70], [0, 0.0])
            row[0] += 1
            row[1] += e.time_range.elapsed_us()
    out = dict(wall_ms_per_step=round(wall_ms / steps, 4), device_busy_ms_per_step=round(busy_ms / steps, 4),
               beside_graph={k: dict(per_step=round(n / steps, 2), us_per_step=round(us / steps, 2))
                             for k, (n, us) in sorted(beside.items(), key=lambda kv: -kv[1][1])[:15]})
    host = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0),
                  key=lambda e: -e.self_cpu_time_total)[:15]
    out["host_top_self_us_per_step"] = {e.key[:60]: round(e.self_cpu_time_total / steps, 1) for e in host}
    log(f"steps: wall {out['wall_ms_per_step']} ms/step, device busy {out['device_busy_ms_per_step']} ms/step")
    for k, v in out["beside_graph"].items():
        log(f"  beside the graph: {k:70s} {v['per_step']:5.2f}/step {v['us_per_step']:8.2f} us/step")
    for k, v in out["host_top_self_us_per_step"].items():
        log(f"  host self: {k:60s} {v:8.1f} us/step")
    return out


def dev_is_cuda() -> bool:
    return not SMOKE and torch.cuda.is_available()


def run_thr512(llm) -> dict:
    """peers.py's thr512 (512 requests, input U[64,1024], output U[16,512], seed 0) on this engine."""
    from pagedserve import SamplingParams
    try:
        from peers import workload
    except ImportError:
        import random

        def workload(n, seed=0):
            rng = random.Random(seed)
            return [([rng.randrange(3, 32000) for _ in range(rng.randint(64, 1024))], rng.randint(16, 512))
                    for _ in range(n)]
    n = 8 if SMOKE else 512
    reqs = [([t % 500 for t in p[:48]], min(o, 8)) for p, o in workload(n)] if SMOKE else workload(n)
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    sps = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0, detokenize=False) for _, o in reqs]
    llm.generate(prompts[:8], sps[:8], use_tqdm=False)
    t0 = time.time()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    dt = time.time() - t0
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    res = dict(wall_s=round(dt, 2), out_tok_s=round(gen / dt, 1), gen_tokens=gen)
    log(f"thr{n}: {json.dumps(res)}")
    return res


@stage("bf16")
def bf16_stage(out_dir: str) -> None:
    if SMOKE:
        log("bf16 agreement: skipped on the CPU smoke run")
        return
    path = os.path.join(out_dir, "bf16_agreement.json")
    proc = subprocess.run([sys.executable, "benchmarks/bf16_agreement.py", path, "cuda"], capture_output=True,
                          text=True, timeout=240)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines()
             if any(key in ln for key in ("identical", "RESULT", "Error", "error"))]
    log("\n".join(lines[-12:]) or f"bf16_agreement exited {proc.returncode} without output")
    RESULTS["bf16_rc"] = proc.returncode


TESTS_MORE = [] if "--all-tests" not in sys.argv else ["tests/kernels/test_gemv.py", "tests/kernels/test_fused_ops.py"]


@stage("tests")
def tests_stage() -> None:
    """The kernel tests of the decode attention path on the GPU (bf16 included; ~30 s); with
    --all-tests the gemv and fused-op tests too (~60 s more)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           "tests/kernels/test_argmax.py",
                           "tests/kernels/test_store_kv.py",
                           "tests/kernels/test_paged_attention.py"] + TESTS_MORE,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PAGEDSERVE_TEST_DEVICE": "cuda"})
    log("\n".join((proc.stdout + proc.stderr).splitlines()[-15:]))
    RESULTS["tests_rc"] = proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="check,attn,models")
    ap.add_argument("--models", default="llama-1b,llama-8b")
    ap.add_argument("--ab", default="llama-1b,llama-8b", help="models measured in every --variants")
    ap.add_argument("--variants", default="default,base", help=f"of {list(VARIANTS)}; the first for the others")
    ap.add_argument("--thr", default="llama-1b", help="models whose variants also run peers' thr512")
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--all-tests", action="store_true", help="tests: the gemv and fused-op tests too")
    ap.add_argument("--roles", default="", help="sweep only these matmuls (qkv,o,gate_up,down,lm_head) over "
                                                "QUICK_CONFIGS (~30 s for qkv,o,gate_up of two models)")
    args = ap.parse_args()
    ROLES[:] = [r for r in args.roles.split(",") if r]
    stages, models = args.stages.split(","), args.models.split(",")
    ab = [m for m in args.ab.split(",") if m]
    dev = torch.device("cpu" if SMOKE else "cuda")
    dtype = torch.float16 if SMOKE else torch.bfloat16   # the interpreter has no bfloat16
    out_dir = os.environ.get("OUT", "/tmp/decode_gpu")
    os.makedirs(out_dir, exist_ok=True)
    if dev.type == "cuda":
        import triton
        RESULTS["machine"] = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
        log(RESULTS["machine"])
    t0 = time.time()
    if "check" in stages:
        check(dev, dtype)
    if "attn" in stages:
        attn_stage(dev, dtype, models)
    sweep_first = "swept" in args.variants.split(",")   # its table comes from the sweep
    if "sweep" in stages and sweep_first:
        sweep(dev, dtype, models)
    if "models" in stages:   # before other sweeps: the end-to-end figures first, if time runs out
        models_stage(dev, models, ab, args.variants.split(","), [m for m in args.thr.split(",") if m])
    if "sweep" in stages and not sweep_first:
        sweep(dev, dtype, models)
    if "bf16" in stages:
        bf16_stage(out_dir)
    if "tests" in stages and not SMOKE:
        tests_stage()
    RESULTS["wall_s"] = round(time.time() - t0, 1)
    with open(os.path.join(out_dir, "decode_gpu.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    log("RESULT " + json.dumps({k: v for k, v in RESULTS.items() if k not in ("sweep", "models")}, default=str))
    log(f"total {RESULTS['wall_s']} s; failed stages: {RESULTS.get('failed', [])}")


if __name__ == "__main__":
    main()
