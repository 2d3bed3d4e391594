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
This file has check, attn, bf16, tests and the entry point; decode_sweep.py the sweep,
decode_models.py the models stage (and its profile tables), decode_common.py what they share.

Usage (repo root, PYTHONPATH=$PWD; peers.py in .devcarry/, .. or ../shared/bench/):
  python3 benchmarks/decode_gpu.py [--stages check,attn,models] [--models llama-1b,llama-8b]
                                   [--variants default,base,unfused] [--thr llama-1b] [--cpu-smoke]
About 120 s on an H200 with a cold Triton cache (+ ~60 s with tests). Writes decode_gpu.json
(and bf16 json) under $OUT when set. --cpu-smoke runs every stage on a tiny model and tiny
shapes on the CPU (Triton's interpreter) to prove the script, not to measure."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# decode_common first: it sets TRITON_INTERPRET for --cpu-smoke before anything imports Triton
from decode_common import MAX_MODEL_LEN, RESULTS, SHAPES, SMOKE, log, stage, time_us, weight_shapes
import torch
from decode_models import BATCH_PROFILE, VARIANTS, models_stage
from decode_sweep import ROLES, sweep

from pagedserve.layers.triton_gemv import GemvConfig, gemv, silu_and_mul_gemv


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
    ap.add_argument("--batch-profile", default="", help="decode graph sizes (e.g. 64,256) also profiled kernel by "
                                                        "kernel at context 800 (decode_models.profile_batch)")
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--all-tests", action="store_true", help="tests: the gemv and fused-op tests too")
    ap.add_argument("--roles", default="", help="sweep only these matmuls (qkv,o,gate_up,down,lm_head) over "
                                                "QUICK_CONFIGS (~30 s for qkv,o,gate_up of two models)")
    args = ap.parse_args()
    ROLES[:] = [r for r in args.roles.split(",") if r]
    BATCH_PROFILE[:] = [int(r) for r in args.batch_profile.split(",") if r]
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
