"""decode_gpu.py's models stage: per model and variant, b1_decode tok/s, the decode graph's replay
time and a torch.profiler table of it (per kernel calls, us, bytes, GB/s), a CPU + CUDA profile of
a short generate, and peers' thr512 on the same engine."""
from __future__ import annotations

import gc
import json
import os
import time
import traceback

from decode_common import (HBM_TB_S, RESULTS, SHAPES, SMOKE, TIED, decode_context, log, replay_ms, set_decode_inputs,
                           stage, weight_shapes)
from decode_sweep import SWEPT
import torch

from pagedserve.layers import linear_ops
from pagedserve.layers.triton_gemv import GemvConfig


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


def profile_replay(graph, model: str, ctx: int, replays: int = 5, rows: int = 1) -> dict:
    """torch.profiler over `replays` replays of a decode graph of `rows` rows: per kernel (role
    for the matmuls, by order: qkv, o, gate_up, down per layer, then the LM head) calls, us,
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
    return kernel_table(kernels, model, ctx, replays, rows)


def kernel_table(kernels: list, model: str, ctx: int, replays: int, rows: int = 1) -> dict:
    """The table of profiler kernel events (in launch order) of `replays` decode steps of `rows`
    rows each: a matmul's bytes are its weight's (and its TFLOP/s is printed where rows > 1), the
    other kernels' bytes are per row times rows."""
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
        nbytes = shapes[role][0] * shapes[role][1] * 2 if role else rows * bytes_of(kind, model, ctx)
        row = table.setdefault(key, dict(calls=0, us=0.0, bytes=0, flop=0, names=set()))
        row["flop"] += 2 * shapes[role][0] * shapes[role][1] * rows if role else 0
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
        tflops = r["flop"] / replays / us / 1e6 if us and r["flop"] and rows > 1 else None
        out[key] = dict(calls=r["calls"] // replays, us=round(us, 1), mb=round(nbytes / 1e6, 3),
                        gb_s=round(gbs) if gbs else None, names=sorted(r["names"]))
        if tflops:
            out[key]["tflop_s"] = round(tflops)
        log(f"{key:26s} {r['calls'] // replays:6d} {us:9.1f} {100 * us / total_us:5.1f}% {nbytes / 1e6:9.2f} "
            f"{gbs or 0:8.0f}  {f'{tflops:.0f} TFLOP/s ' if tflops else ''}{', '.join(sorted(r['names']))[:90]}")
    log(f"{'total (kernels)':26s} {len(kernels) // replays:6d} {total_us:9.1f} 100.0% {total_bytes / 1e6:9.2f} "
        f"{total_bytes / total_us / 1e3:8.0f}   floor at {HBM_TB_S} TB/s: {total_bytes / HBM_TB_S / 1e6:.1f} us")
    return dict(kernels=out, kernel_us=round(total_us, 1), launches=len(kernels) // replays,
                mbytes=round(total_bytes / 1e6, 1), floor_us=round(total_bytes / HBM_TB_S / 1e6, 1))


VARIANTS = {   # name: (gemv fusions, packed step inputs + Triton argmax)
    "default": (True, True), "base": (True, False), "unfused": (False, False),
    # the library's defaults with the gemv table updated by this run's sweep (SWEPT), and the
    # defaults once more after it (the drift between two runs of one engine)
    "swept": (True, True), "default2": (True, True), "old": (True, True),
    # the decode-attention switches set as DECODE_ATTENTION says, and the defaults once more after them
    "fusedattn": (True, True), "merge": (True, True), "fusedmerge": (True, True), "default3": (True, True),
    "nofusion": (True, True)}
# variant: (TritonBackend.fused_decode: rotary and the KV store inside the decode attention launch,
# triton_paged_attention.MERGE_IN_KERNEL: split-K merged in that launch); other variants keep the
# library's settings (both on since session 13)
DECODE_ATTENTION = {"fusedattn": (True, False), "merge": (False, True), "fusedmerge": (True, True),
                    "nofusion": (False, False)}
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
    from pagedserve.attention import triton_paged_attention as tpa
    from pagedserve.attention.backend import TritonBackend
    fused_decode, merge = TritonBackend.fused_decode, tpa.MERGE_IN_KERNEL
    TritonBackend.fused_decode, tpa.MERGE_IN_KERNEL = DECODE_ATTENTION.get(variant, (fused_decode, merge))
    try:
        run_engine(dev, model, variant, thr512, label, gemv_fusion, packed_inputs)
    finally:
        triton_gemv.CONFIGS.clear()
        triton_gemv.CONFIGS.update(table)
        TritonBackend.fused_decode, tpa.MERGE_IN_KERNEL = fused_decode, merge


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
    t0, m0 = time.time(), time.monotonic()
    second = llm.generate([prompt], [sp], use_tqdm=False)
    dt, m1 = time.time() - t0, time.monotonic()
    res["b1_decode_tok_s"] = round(new / dt, 1)
    # b1_decode's wall = the 128-token prompt's first token (request in, prefill, sampling) + the
    # new - 1 decode steps: split on the request's first_token_time (monotonic, as m0 / m1)
    first_token = second[0].metrics.get("first_token_time")
    if first_token is not None:
        res["first_token_ms"] = round((first_token - m0) * 1e3, 3)
        res["decode_wall_ms_per_step"] = round((m1 - first_token) * 1e3 / (new - 1), 4)
    res["same_ids_twice"] = first[0].outputs[0].token_ids == second[0].outputs[0].token_ids
    res["first_ids"] = list(second[0].outputs[0].token_ids[:8])
    res["ids"] = list(second[0].outputs[0].token_ids)
    graphs = llm.engine.core.executor.runner.graph_runner
    if graphs is not None:
        ctx = decode_context(graphs)
        graph = graphs.graphs[1]
        torch.cuda.synchronize()
        res["replay_ms"] = round(replay_ms(graph, 50), 3)
        res["host_gap_ms"] = round(dt * 1e3 / new - res["replay_ms"], 3)   # per token, beside the replay
        res["context"] = ctx
        log(f"{label}: b1_decode {res['b1_decode_tok_s']} tok/s, replay {res['replay_ms']} ms "
            f"({1e3 / res['replay_ms']:.0f} tok/s if the host were free), context {ctx}; first token "
            f"{res.get('first_token_ms')} ms, then {res.get('decode_wall_ms_per_step')} ms a decode step")
        res["profile"] = profile_replay(graph, model, ctx)
        for rows in BATCH_PROFILE:
            try:
                res[f"profile_rows{rows}"] = profile_batch(llm, graphs, model, rows, BATCH_CONTEXT)
            except Exception:   # a diagnostic: the b1 figures and thr512 still come
                traceback.print_exc()
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


BATCH_PROFILE: list[int] = []   # decode_gpu.py --batch-profile: graph sizes profiled as profile_batch does
BATCH_CONTEXT = 800   # ~thr512's mean context in its decode tail (input U[64,1024] + half the output)


def profile_batch(llm, graphs, model: str, rows: int, ctx: int) -> dict:
    """The decode graph of `rows` rows replayed at context `ctx` every row, each row's keys in its
    own blocks (distinct ids, so the attention reads what a real step reads, not one block over
    and over), nothing stored (slot -1): where a thr512 decode-tail step's time goes, kernel by
    kernel (RESULTS.md: ~15.5 ms a step at ~241 rows against ~12 ms of matmul and KV floors)."""
    if rows not in graphs.graphs:
        log(f"no decode graph of {rows} rows (captured: {sorted(graphs.graphs)[-4:]} ...)")
        return {}
    k_cache = llm.engine.core.executor.runner.kv_caches[0][0]
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    per_row = -(-(ctx + 1) // block_size)
    if rows * per_row > num_blocks:
        log(f"{rows} rows x {per_row} blocks > {num_blocks} KV blocks: not profiled")
        return {}
    set_decode_inputs(graphs, rows, ctx, per_row)
    torch.cuda.synchronize()
    ms = replay_ms(graphs.graphs[rows], 10)
    log(f"{model}: decode graph of {rows} rows at context {ctx}: replay {ms:.3f} ms "
        f"({rows / ms * 1e3:.0f} tok/s a step)")
    table = profile_replay(graphs.graphs[rows], model, ctx, rows=rows)
    set_decode_inputs(graphs, rows, None)   # as the runner leaves padding rows
    return dict(replay_ms=round(ms, 3), **table)


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
