"""Tensor parallelism on a multi-GPU machine (issues 9 and 17): llama-8b dummy weights, same seed,
the peers workloads (input U[64,1024], output U[16,512], seed 0: thr512; b1_decode; ttft1024),
copied here so the script needs nothing outside the repository. Every mode prints RESULT lines.

  python3 benchmarks/tp_gpu.py allreduce [RANKS]      custom all-reduce vs NCCL: sums (eager and in a
                                                      CUDA graph), latencies (RANKS GPUs, default 2)
  python3 benchmarks/tp_gpu.py ids TP VARIANT OUT.json   greedy ids of 32 prompts x 64 tokens
  python3 benchmarks/tp_gpu.py compare A.json B.json     match rate of two ids files
  python3 benchmarks/tp_gpu.py summary RESULTS.txt       one line per engine (start-up, KV tokens, thr512,
                                                      b1_decode, ttft1024) and per ids comparison
  python3 benchmarks/tp_gpu.py peers TP VARIANT [IDS.json]   thr512, b1_decode, ttft1024 (the ids first, if given)
  python3 benchmarks/tp_gpu.py profile TP VARIANT        torch.profiler of TP decode steps (rank 0)
  python3 benchmarks/tp_gpu.py h2d                       a host -> device copy while the GPU is busy
The profiling stages (profile, h2d, the host phases of peers) live in benchmarks/tp_profile.py, the
all-reduce check in benchmarks/tp_allreduce.py.

VARIANT switches issue 17's pieces (each one alone can be measured against `base`):
  base    step messages by NCCL broadcast, NCCL all-reduces, lockstep   (before issue 17)
  shm     + step messages through the shared-memory queue
  car     + symmetric-memory one-shot all-reduce (custom all-reduce)
  all     + async scheduling under TP (rank 0's sampled ids broadcast on device)   (the default up to session 5)
  asyncnocar  shm + async, NCCL all-reduces
  all4m   all, custom all-reduce up to 4 MiB (decode steps up to 512 rows) instead of 1 MiB
  push    all, with the push all-reduce (two ranks: one one-way signal per all-reduce); push4m up to 4 MiB
          (push4m is the engine's TP=2 default now: time TP=2 as shipped with it)
TP=1 runs use `all`: there only async scheduling applies (its default on CUDA). At TP=4 `all` is the
engine's default (the push kernel is for two ranks: more take torch's one-shot up to 1 MiB).
Set ENFORCE_EAGER=1 to run without CUDA graphs, PP=N for N pipeline stages (benchmarks/pp_gpu.sh; the
shm queue, custom all-reduce and async TP of a variant do not apply under PP; `peers` then also
prints rank 0's host time per step by phase, *_host_phases); DRY=1 runs every mode
but allreduce on CPU with a tiny model and 16 requests (the script's own check, no timing meaning).

Issue 17 part 2, second pass (`bash benchmarks/tp_gpu.sh tp17`):
  python3 benchmarks/tp_gpu.py sweep TP OUT.json         M=1 gemv launch shapes at this TP's weight
                                                         shards (one GPU); the ones that beat today's
                                                         launch by >2% go to OUT.json
  python3 benchmarks/tp_gpu.py suite TP VARIANT PREFIX   one engine: ids (PREFIX_ids.json), peers with
                                                         host phases of rank 0 and of the other ranks,
                                                         then the decode profile by kernel kind
GEMV_CONFIGS=OUT.json applies sweep's launch shapes on every rank (a sitecustomize on the spawned
ranks' PYTHONPATH: benchmark-only, the engine has no such knob); RANK_PHASES=1 makes every spawned
rank print its host time per step (waiting for the message, the runner) every 128 steps."""
import json
import os
import random
import sys
import time

from tp_profile import HOST_PHASES, emit, emit_phases, h2d_probe, reset_phases, run_profile, wrap_host_phases
os.environ.setdefault("PAGEDSERVE_COMPILE_AHEAD_STRICT", "1")   # a failed compile-ahead fails the run

MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}
DRY = os.environ.get("DRY") == "1"
if DRY:   # the gemv sweep's kernels through Triton's interpreter (before anything imports triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")
# TP_MODEL=llama-70b GPU_UTIL=0.9 MAX_LEN=4096: the seed's large-model case (issue 17 part 5); MAX_SEQS=128
# as the seed's vLLM command line (issue 24, benchmarks/multi4_gpu.sh; the engine's default if unset)
MODEL = "tiny" if DRY else os.environ.get("TP_MODEL", "llama-8b")
GPU_UTIL, MAX_LEN = float(os.environ.get("GPU_UTIL", "0.85")), int(os.environ.get("MAX_LEN", "2048"))
THR_N = 16 if DRY else 512
VARIANTS = {   # name -> (step queue, custom all-reduce up to KiB (0: off), async scheduling, its kernel)
    "base": ("broadcast", 0, False, "one_shot"),
    "shm": ("shm", 0, False, "one_shot"),
    "car": ("shm", 1024, False, "one_shot"),
    "all": ("shm", 1024, True, "one_shot"),
    "asyncnocar": ("shm", 0, True, "one_shot"),
    "all4m": ("shm", 4096, True, "one_shot"),
    "push": ("shm", 1024, True, "push"),       # all, with the push all-reduce (layers/triton_all_reduce.py)
    "push4m": ("shm", 4096, True, "push"),
}

PP = int(os.environ.get("PP", "1"))
MAX_BATCHED = int(os.environ["MAX_BATCHED"]) if os.environ.get("MAX_BATCHED") else None   # engine default if unset
MAX_SEQS = int(os.environ["MAX_SEQS"]) if os.environ.get("MAX_SEQS") else None
EAGER = os.environ.get("ENFORCE_EAGER") == "1"


VOCAB = 128256


def make_model_dir(name: str) -> str:
    d = f"/tmp/models/{name}"
    os.makedirs(d, exist_ok=True)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB,
               max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
               hidden_act="silu", torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, **MODELS[name])
    json.dump(cfg, open(f"{d}/config.json", "w"))
    return d


def workload(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        il = rng.randint(64, 1024)
        ol = rng.randint(16, 512)
        reqs.append(([rng.randrange(3, 32000) for _ in range(il)], ol))
    return reqs


# Runs at start-up in every rank this process spawns once install_rank_hooks put it on their
# PYTHONPATH (benchmark-only: the engine has no knob for launch shapes or per-rank timers).
SITE_HOOKS = r'''
import json, os, sys, time
if os.environ.get("GEMV_CONFIGS"):
    from pagedserve.layers import triton_gemv
    triton_gemv.CONFIGS.update({tuple(map(int, k.split("x"))): triton_gemv.GemvConfig(*v)
                                for k, v in json.load(open(os.environ["GEMV_CONFIGS"])).items()})
if os.environ.get("PAGEABLE_INPUTS") == "1":   # step inputs as one pageable copy per array, as before
    from pagedserve.worker import input_batch
    input_batch.PACK_STEP_INPUTS = False
if os.environ.get("RANK_PHASES") == "1":
    from pagedserve.worker import tp_worker
    from pagedserve.worker.model_runner import ModelRunner
    _stats = dict(recv=0.0, runner=0.0, steps=0, rows=0, start=None)
    _receive, _execute = tp_worker.receive_message, ModelRunner.execute_model

    def _timed_receive(*args, **kwargs):
        start = time.perf_counter()
        try:
            return _receive(*args, **kwargs)
        finally:
            _stats["recv"] += time.perf_counter() - start

    def _timed_execute(self, so, *args, **kwargs):
        start = time.perf_counter()
        if _stats["start"] is None:
            _stats.update(recv=0.0, start=start)
        try:
            return _execute(self, so, *args, **kwargs)
        finally:
            _stats["runner"] += time.perf_counter() - start
            _stats["steps"] += 1
            _stats["rows"] += len(so.num_scheduled_tokens)
            if _stats["steps"] == 128:
                n, wall = 128, time.perf_counter() - _stats["start"]
                print("RANK_PHASES " + json.dumps(dict(
                    pid=os.getpid(), steps=n, mean_rows=round(_stats["rows"] / n, 2),
                    wall_ms_per_step=round(wall * 1e3 / n, 3), wait_message_ms=round(_stats["recv"] * 1e3 / n, 3),
                    runner_ms=round(_stats["runner"] * 1e3 / n, 3))), file=sys.stderr, flush=True)
                _stats.update(runner=0.0, steps=0, rows=0, start=None)

    tp_worker.receive_message = _timed_receive
    ModelRunner.execute_model = _timed_execute
'''


def apply_gemv_configs(path: str) -> None:
    from pagedserve.layers import triton_gemv
    configs = json.load(open(path))
    triton_gemv.CONFIGS.update({tuple(map(int, k.split("x"))): triton_gemv.GemvConfig(*v) for k, v in configs.items()})
    emit(workload="gemv_configs_applied", path=path, configs=configs)


def install_rank_hooks() -> None:
    """GEMV_CONFIGS / RANK_PHASES / PAGEABLE_INPUTS: SITE_HOOKS as the sitecustomize of every
    rank spawned from here on (RankProcess passes PYTHONPATH on); launch shapes and pageable
    inputs in this process too."""
    if not (os.environ.get("GEMV_CONFIGS") or os.environ.get("RANK_PHASES") == "1"
            or os.environ.get("PAGEABLE_INPUTS") == "1"):
        return
    if os.environ.get("PAGEABLE_INPUTS") == "1":
        from pagedserve.worker import input_batch
        input_batch.PACK_STEP_INPUTS = False
        emit(workload="pageable_inputs")
    import tempfile
    site = tempfile.mkdtemp(prefix="tp_gpu_site_")
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write(SITE_HOOKS)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)
    if os.environ.get("GEMV_CONFIGS"):
        apply_gemv_configs(os.environ["GEMV_CONFIGS"])


def make_llm(tp: int, variant: str):
    install_rank_hooks()
    queue, custom_kb, asynchronous, kind = VARIANTS[variant]
    os.environ["PAGEDSERVE_TP_STEP_QUEUE"] = queue
    os.environ["PAGEDSERVE_CUSTOM_ALL_REDUCE_KIND"] = kind
    os.environ["PAGEDSERVE_CUSTOM_ALL_REDUCE_MAX_KB"] = str(custom_kb or 1024)
    from pagedserve import LLM
    t0 = time.time()
    device = dict(device="cpu", dtype="float32") if DRY else dict(dtype="bfloat16", gpu_memory_utilization=GPU_UTIL)
    llm = LLM(model=make_model_dir(MODEL), load_format="dummy", skip_tokenizer_init=True, **device,
              max_model_len=MAX_LEN, max_num_seqs=MAX_SEQS, seed=0, tensor_parallel_size=tp, pipeline_parallel_size=PP,
              enforce_eager=EAGER, disable_custom_all_reduce=not custom_kb,
              async_scheduling=asynchronous, max_num_batched_tokens=MAX_BATCHED)
    startup = round(time.time() - t0, 1)
    from pagedserve.layers import parallel
    core = llm.engine.core
    runner = getattr(core.executor, "runner", None)
    graphs = getattr(runner, "graph_runner", None)
    queue = getattr(getattr(core.executor, "steps", None), "queue", None)
    # what the engine really runs (a piece that failed to set up falls back silently but for a log line)
    emit(engine="pagedserve", model=MODEL, tp=tp, pp=PP, variant=variant, eager=EAGER, startup_s=startup,
         max_num_batched_tokens=core.scheduler.max_num_batched_tokens, max_num_seqs=core.scheduler.max_num_seqs,
         decode_graphs=len(graphs.graphs) if graphs else 0, prefill_graphs=len(graphs.prefill_graphs) if graphs else 0,
         custom_all_reduce=type(parallel._custom_all_reduce).__name__ if parallel._custom_all_reduce else None,
         shm_step_queue=queue is not None,
         async_scheduling=core.async_scheduling, kv_blocks=core.executor.num_blocks,
         kv_tokens=core.executor.num_blocks * core.config.cache.block_size)
    return llm


def greedy(max_tokens: int):
    from pagedserve import SamplingParams
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False)


def run_peers(llm, tp: int, variant: str, ttft: bool = True) -> None:
    """peers.py's run_engine workloads, timed the same way (ttft1024 unless `ttft` is False)."""
    tags = dict(engine="pagedserve", model=MODEL, tp=tp, pp=PP, variant=variant, eager=EAGER,
                max_num_batched_tokens=MAX_BATCHED)
    reqs = workload(THR_N)
    if DRY:
        reqs = [(p[:64], min(o, 8)) for p, o in reqs]
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    sps = [greedy(o) for _, o in reqs]
    llm.generate(prompts[:8], sps[:8], use_tqdm=False)   # warm-up
    wrap_host_phases()   # where rank 0's host time goes per step (a few perf_counter calls a step)
    reset_phases()
    t0 = time.time()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    dt = time.time() - t0
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    emit(**tags, workload=f"thr{THR_N}", wall_s=round(dt, 2), req_s=round(THR_N / dt, 2), out_tok_s=round(gen / dt, 1),
         total_tok_s=round((gen + sum(len(p) for p, _ in reqs)) / dt, 1), gen_tokens=gen)
    if HOST_PHASES:
        emit_phases(tags, f"thr{THR_N}", dt)
    p = {"prompt_token_ids": list(range(100, 228))}
    b1 = 16 if DRY else 256
    llm.generate([p], [greedy(b1)], use_tqdm=False)
    reset_phases()   # not the warm-up's
    t0 = time.time()
    llm.generate([p], [greedy(b1)], use_tqdm=False)
    dt = time.time() - t0
    emit(**tags, workload="b1_decode", wall_s=round(dt, 3), tok_s=round(b1 / dt, 1))
    if HOST_PHASES:
        emit_phases(tags, "b1_decode", dt)
    if not ttft:
        return
    warm = {"prompt_token_ids": [(i * 7) % 32000 + 3 for i in range(1024)]}
    llm.generate([warm], [greedy(1)], use_tqdm=False)
    p = {"prompt_token_ids": [(i * 11 + 5) % 32000 + 3 for i in range(1024)]}
    t0 = time.time()
    llm.generate([p], [greedy(1)], use_tqdm=False)
    emit(**tags, workload="ttft1024", ms=round((time.time() - t0) * 1e3, 1))


def run_ids(llm, out_path: str) -> None:
    reqs = workload(32, seed=7)
    outs = llm.generate([{"prompt_token_ids": p[:256]} for p, _ in reqs], greedy(64), use_tqdm=False)
    json.dump([o.outputs[0].token_ids for o in outs], open(out_path, "w"))


def compare(a_path: str, b_path: str) -> None:
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    same = sum(x == y for x, y in zip(a, b))
    prefix = [next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x)) for x, y in zip(a, b)]
    emit(workload="ids_match", a=os.path.basename(a_path), b=os.path.basename(b_path), prompts=len(a),
         identical=same, match_rate=round(same / len(a), 3), mean_common_prefix=round(sum(prefix) / len(prefix), 1),
         token_agreement=round(sum(s == t for x, y in zip(a, b) for s, t in zip(x, y)) / sum(len(x) for x in a), 4))


def summary(path: str) -> None:
    """The RESULT lines of `path` (the other modes' and serve_gpu.py's output, any order) in a few lines."""
    engines: dict[tuple, dict] = {}
    matches = []
    for line in open(path):
        try:
            r = json.loads(line[len("RESULT "):]) if line.startswith("RESULT ") else None
        except ValueError:   # cut short
            r = None
        if r is None:
            continue
        kind = r.get("workload")
        if kind == "serve_ready":
            matches.append(f"serve {r['engine']}: ready in {r['s']} s")
        elif kind == "serve":
            pair = lambda k: f"{r[k]['p50']:.1f} / {r[k]['p99']:.1f}"   # noqa: E731
            matches.append(f"serve {r['engine']} at {r['rate']} req/s: {r['completed']} done, {r['failed']} failed, "
                           f"{r['out_tok_s']} out tok/s, TTFT P50/P99 {pair('ttft')} ms, TPOT {pair('tpot')} ms")
        elif kind in ("custom_allreduce_check", "allreduce_latency_in_graph"):
            matches.append(f"{kind}: " + json.dumps({k: v for k, v in r.items() if k not in ("workload", "checks", "mismatches")}))
        elif kind == "ids_match":
            matches.append(f"ids {r['a']} vs {r['b']}: {r['identical']}/{r['prompts']} identical "
                           f"({r['match_rate']:.1%}), {r['token_agreement']:.1%} of tokens, "
                           f"mean common prefix {r['mean_common_prefix']}")
        elif "tp" in r:
            row = engines.setdefault((r["model"], r["tp"], r["pp"], r["variant"]), {})
            if kind is None:
                row.update(startup_s=r["startup_s"], kv_tokens=r["kv_tokens"])
            elif kind.startswith("thr") and "phases" not in kind:
                row[f"{kind}_out_tok_s"] = r["out_tok_s"]
            elif kind == "b1_decode":
                row["b1_decode_tok_s"] = r["tok_s"]
            elif kind == "ttft1024":
                row["ttft1024_ms"] = r["ms"]
    for (model, tp, pp, variant), row in engines.items():
        print(f"{model} TP={tp} PP={pp} ({variant}): " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    print("\n".join(matches), flush=True)


def shard_shapes(tp: int) -> dict[str, tuple[int, int]]:
    """(N, K) of one rank's weight per matmul of MODEL at this TP (KV heads replicated below tp)."""
    m = MODELS[MODEL]
    h, i, heads, kv = m["hidden_size"], m["intermediate_size"], m["num_attention_heads"], m["num_key_value_heads"]
    d = h // heads
    return {"qkv": ((heads + 2 * max(kv, tp)) * d // tp, h), "o": (h, heads * d // tp), "gate_up": (2 * i // tp, h),
            "down": (h, i // tp), "lm_head": ((512 if DRY else VOCAB) // tp, h)}


def sweep_gemv(tp: int, out_path: str) -> None:
    """Batch-1 matmuls at this TP's shard shapes, each as the decode step calls it (qkv and
    gate_up with the RMSNorm prologue, down with SiLU-and-mul, o and the LM head plain, where
    linear() picks cuBLAS or the gemv): today's launch against a grid of launch shapes and
    cuBLAS, each timed in a CUDA graph of 40 calls cycling weight copies past the L2 (one GPU).
    OUT.json gets the launch shapes that beat today's call by more than 2%."""
    import torch
    import torch.nn.functional as F
    from pagedserve.layers import linear_ops
    from pagedserve.layers.triton_gemv import GemvConfig, gemv, silu_and_mul_gemv
    dev = torch.device("cpu" if DRY else "cuda:0")
    dtype = torch.bfloat16
    if DRY:
        configs = [GemvConfig(16, 64, 4, 2), GemvConfig(8, 64, 4, 2)]
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from gemv_sweep import time_us as graph_time_us
        # the neighbourhood of the TP=1 table's winners (triton_gemv.CONFIGS): ~30 compilations
        configs = [GemvConfig(*c) for c in ((4, 2048, 4, 4), (8, 512, 4, 4), (8, 1024, 4, 4), (16, 256, 4, 4),
                                            (16, 512, 4, 4), (16, 1024, 4, 4), (32, 256, 4, 4), (32, 512, 4, 4),
                                            (8, 1024, 8, 4), (16, 512, 8, 4))]

    def time_us(fn, weights) -> float:
        if not DRY:
            return graph_time_us(fn, weights)
        t0 = time.perf_counter()
        fn(weights[0])
        return (time.perf_counter() - t0) * 1e6
    best_configs = {}
    for role, (n, k) in shard_shapes(tp).items():
        nbytes = n * k * 2
        copies = 1 if DRY else max(3, -(-600 * 2**20 // nbytes))
        weights = [(torch.randn(n, k, device=dev) * 0.02).to(dtype) for _ in range(copies)]
        x, gate_up = torch.randn(1, k, device=dev).to(dtype), torch.randn(1, 2 * k, device=dev).to(dtype)
        if role == "down":
            call = lambda w, c: silu_and_mul_gemv(gate_up, w, c)  # noqa: E731
        else:   # plain: linear() picks cuBLAS or the gemv (today's call); the grid is the gemv's
            call = lambda w, c: linear_ops.linear(x, w) if c is None else gemv(x, w, c)  # noqa: E731
        current = time_us(lambda w: call(w, None), weights)
        cublas = time_us(lambda w: F.linear(x, w), weights)
        timed = []
        for cfg in configs:
            try:
                timed.append((time_us(lambda w, c=cfg: call(w, c), weights), cfg))
            except Exception as exc:   # a tile too large for shared memory or registers
                print(f"{role} {cfg}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
        timed.sort(key=lambda t: t[0])
        best_us, best = timed[0]
        if best_us < 0.98 * current:
            best_configs[f"{n}x{k}"] = [best.block_n, best.block_k, best.num_warps, best.num_stages]
        emit(workload="gemv_sweep", tp=tp, role=role, n=n, k=k, mbytes=round(nbytes / 2**20, 1),
             current_us=round(current, 2), current_tb_s=round(nbytes / current / 1e6, 2), cublas_us=round(cublas, 2),
             best_us=round(best_us, 2), best_tb_s=round(nbytes / best_us / 1e6, 2), best=best.__dict__,
             top3=[(round(t, 2), c.__dict__) for t, c in timed[:3]], taken=f"{n}x{k}" in best_configs)
        del weights
        if not DRY:
            torch.cuda.empty_cache()
    json.dump(best_configs, open(out_path, "w"))
    emit(workload="gemv_sweep_configs", tp=tp, path=out_path, configs=best_configs)


def main() -> None:
    mode = sys.argv[1]
    if mode == "h2d":
        h2d_probe()
        return
    if mode == "compare":
        compare(sys.argv[2], sys.argv[3])
        return
    if mode == "summary":
        summary(sys.argv[2])
        return
    if mode == "allreduce":
        from tp_allreduce import check_allreduce
        check_allreduce(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
        return
    if mode == "sweep":
        sweep_gemv(int(sys.argv[2]), sys.argv[3])
        return
    tp, variant = int(sys.argv[2]), sys.argv[3]
    llm = make_llm(tp, variant)
    if mode == "ids":
        run_ids(llm, sys.argv[4])
    elif mode == "profile":
        run_profile(llm, tp, variant)
    elif mode == "ab":   # an A/B arm: thr512 and b1_decode (host phases), ids first when PREFIX is given
        if len(sys.argv) > 4:
            run_ids(llm, f"{sys.argv[4]}_ids.json")
        run_peers(llm, tp, variant, ttft=False)
    elif mode == "suite":   # one start-up for all three (~20 s each on the H200s)
        run_ids(llm, f"{sys.argv[4]}_ids.json")
        run_peers(llm, tp, variant)
        run_profile(llm, tp, variant)
    else:
        if len(sys.argv) > 4:
            run_ids(llm, sys.argv[4])
        run_peers(llm, tp, variant)
    llm.shutdown()
    sys.stdout.flush()
    os._exit(0)   # NCCL teardown at exit hung on this machine (tp_executor.shutdown)


if __name__ == "__main__":
    main()
