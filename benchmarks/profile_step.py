"""Where a step's time goes on the GPU machine.
Usage: python3 benchmarks/profile_step.py llama-1b|llama-8b [decode|b1host|thr|thrq|ttft ...] [lockstep] [key=value ...]
  decode: b1 decode wall, graph replay time, and the kernel table of one eager bs=1 step
  b1host: cProfile (host side) of the b1 decode (256 steps)
  thr:    cProfile (host side) of 512 requests of the peers workload (thr512)
  thrq:   thr512 timed only (for sweeps of engine arguments)
  ttft:   kernel table of one 1024-token prefill
  ttftrep: ttft1024 wall time of 8 fresh prompts (one figure is noisy: the step is host-bound)
  ttftdiag: where a ttft1024 goes: fresh prompts plain / after gc.freeze, the eager forward's
          host enqueue vs device time, host cost per launch of each kernel, cProfile by phase
  lockstep: async scheduling off (`thr lockstep` vs `thr` is the on/off A/B on one machine)
  key=value: extra LLM(...) arguments, e.g. max_num_seqs=512 (ints parsed)"""
import cProfile
import io
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".devcarry")
from peers import make_model_dir  # noqa: E402
from peers_thr import run_thr, thr_requests  # noqa: E402

from pagedserve import LLM, SamplingParams  # noqa: E402

name = sys.argv[1]
stages = [a for a in sys.argv[2:] if "=" not in a] or ["decode"]
extra = {k: int(v) if v.isdigit() else v for k, v in (a.split("=", 1) for a in sys.argv[2:] if "=" in a)}
t_start = time.time()
llm = LLM(model=make_model_dir(name), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
          max_model_len=2048, gpu_memory_utilization=0.85, seed=0,
          async_scheduling=False if "lockstep" in stages else None, **extra)
print(f"{name} {extra}: ready in {time.time() - t_start:.1f} s")


def kernel_table(fn, rows=20):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as pr:
        fn()
        torch.cuda.synchronize()
    print(pr.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


if "decode" in stages:
    prompt = {"prompt_token_ids": list(range(100, 228))}
    sp = SamplingParams(max_tokens=256, ignore_eos=True, temperature=0.0, detokenize=False)
    llm.generate([prompt], [sp], use_tqdm=False)
    t0 = time.time()
    llm.generate([prompt], [sp], use_tqdm=False)
    print(f"{name} b1 decode: {256 / (time.time() - t0):.1f} tok/s")
    g = llm.engine.core.executor.runner.graph_runner
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(50):
        g.graphs[1].replay()
    torch.cuda.synchronize()
    print(f"graph replay bs=1: {(time.time() - t0) * 20:.3f} ms")
    with torch.inference_mode():
        kernel_table(lambda: g._forward(1), 25)


def cprofile(fn, label, rows=22):
    prof = cProfile.Profile()
    t0 = time.time()
    prof.enable()
    result = fn()
    prof.disable()
    dt = time.time() - t0
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(rows)
    print(f"--- {label}: {dt:.2f} s under cProfile")
    print(s.getvalue()[:5000])
    return result, dt


if "b1host" in stages:
    prompt = {"prompt_token_ids": list(range(100, 228))}
    sp = SamplingParams(max_tokens=256, ignore_eos=True, temperature=0.0, detokenize=False)
    llm.generate([prompt], [sp], use_tqdm=False)
    cprofile(lambda: llm.generate([prompt], [sp], use_tqdm=False), "b1 decode, 256 steps")
if "thr" in stages or "thrq" in stages:
    outs, dt = run_thr(llm)
    print(f"{name} {extra} thr512: {sum(len(o.outputs[0].token_ids) for o in outs) / dt:.0f} out tok/s")
if "thr" in stages:
    prompts, sps = thr_requests(512)
    outs, dt = cprofile(lambda: llm.generate(prompts, sps, use_tqdm=False), "thr512", 30)
    print(f"thr512 under cProfile: {sum(len(o.outputs[0].token_ids) for o in outs) / dt:.0f} out tok/s")
if "ttftrep" in stages:
    one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0, detokenize=False)
    llm.generate([{"prompt_token_ids": [(i * 7) % 32000 + 3 for i in range(1024)]}], [one], use_tqdm=False)
    times = []
    for k in range(8):
        t0 = time.time()
        llm.generate([{"prompt_token_ids": [(i * (13 + 2 * k) + 5) % 32000 + 3 for i in range(1024)]}], [one],
                     use_tqdm=False)
        times.append(round((time.time() - t0) * 1e3, 1))
    print(f"{name} ttft1024 ms, 8 fresh prompts: {times}")
if "ttft" in stages:
    one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0, detokenize=False)
    seeds = iter(range(11, 100))

    def fresh_prefill():   # a prompt never seen before: no prefix-cache hit
        k = next(seeds)
        llm.generate([{"prompt_token_ids": [(i * k + 3) % 32000 + 3 for i in range(1024)]}], [one], use_tqdm=False)
    kernel_table(fresh_prefill, 15)

if "ttftdiag" in stages:
    import gc

    from pagedserve.attention.metadata import AttentionMetadata
    from pagedserve.attention.triton_paged_attention import paged_attention
    from pagedserve.attention.triton_store_kv import store_kv
    from pagedserve.layers import triton_ops
    one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0, detokenize=False)
    seeds = iter(range(101, 1000, 2))

    def fresh():
        k = next(seeds)
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": [(i * k + 5) % 32000 + 3 for i in range(1024)]}], [one], use_tqdm=False)
        return round((time.perf_counter() - t0) * 1e3, 1)
    fresh()
    print(f"{name} ttft1024 ms plain:      {[fresh() for _ in range(6)]}")
    gc.collect()
    gc.freeze()
    print(f"{name} ttft1024 ms gc.freeze:  {[fresh() for _ in range(6)]}")
    runner = llm.engine.core.executor.runner
    dev = runner.device
    n = 1024
    meta = AttentionMetadata(slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=dev),
                             query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
                             seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
                             block_tables=torch.arange(n // 16, dtype=torch.int32, device=dev)[None],
                             max_query_len=n, max_seq_len=n, num_decodes=0)
    ids = torch.randint(3, 32000, (n,), device=dev)
    pos = torch.arange(n, device=dev)
    with torch.inference_mode():
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            hidden = runner.model(ids, pos, meta)
            logits = runner.model.compute_logits(hidden[-1:])
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            print(f"eager prefill forward: host enqueue {(t1 - t0) * 1e3:.2f} ms, done after {(t2 - t0) * 1e3:.2f} ms")

        def per_call(label, fn, reps=300):
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            print(f"host per call {label:28s} {(t1 - t0) / reps * 1e6:7.1f} us")
        layer = runner.model.attention_layers()[0]
        h = layer.num_kv_heads * layer.head_dim
        x = torch.randn(1, 2048, device=dev, dtype=torch.bfloat16)
        w = torch.randn(2048, device=dev, dtype=torch.bfloat16)
        res = torch.randn(1, 2048, device=dev, dtype=torch.bfloat16)
        q = torch.randn(1, layer.num_heads, layer.head_dim, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, layer.num_kv_heads, layer.head_dim, device=dev, dtype=torch.bfloat16)
        cos = torch.randn(4096, layer.head_dim, device=dev, dtype=torch.bfloat16)
        one_meta = dict(block_tables=meta.block_tables, seq_lens=torch.tensor([1], dtype=torch.int32, device=dev),
                        query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=dev))
        slot = torch.tensor([-1], device=dev)
        weight = torch.randn(2048, 2048, device=dev, dtype=torch.bfloat16)
        per_call("torch F.linear 1x2048x2048", lambda: torch.nn.functional.linear(x, weight))
        per_call("torch add", lambda: x + res)
        per_call("triton rms_norm+residual", lambda: triton_ops.rms_norm(x, w, 1e-5, res))
        per_call("triton silu_and_mul", lambda: triton_ops.silu_and_mul(x))
        per_call("triton rotary", lambda: triton_ops.rotary_in_place(pos[:1], q, k, cos, cos))
        per_call("triton store_kv", lambda: store_kv(k, k, layer.k_cache, layer.v_cache, slot))
        per_call("triton paged_attention", lambda: paged_attention(
            q, layer.k_cache, layer.v_cache, one_meta["block_tables"], one_meta["seq_lens"],
            one_meta["query_start_loc"], 0.1, 1, 1, num_decodes=0))
    prompt = [(i * 997 + 5) % 32000 + 3 for i in range(1024)]
    prof = cProfile.Profile()
    prof.enable()
    llm.generate([{"prompt_token_ids": prompt}], [one], use_tqdm=False)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(45)
    print(out.getvalue()[:9000])
