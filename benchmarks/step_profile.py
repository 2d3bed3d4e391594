"""Where an offline workload's wall time goes (issue 22), step by step: every scheduled step's
prefill tokens, decode rows and the time to the next step's schedule (under async scheduling
that is the device time of a step, once the pipeline is full).

    PYTHONPATH=$PWD python3 benchmarks/step_profile.py [--workload long64|thr512] [--model llama-8b]
        [--variants default,mbt16384,seqs512] [--kernels START:COUNT] [--cpu-smoke]

long64: peers_long.py's (64 requests, input 4k-16k, output 64-256, max_model_len 32768);
thr512: peers.py's (512 requests, input 64-1024, output 16-512, max_model_len 2048, 8 warm-up
requests first). Variants: default, mbtN (max_num_batched_tokens N), seqsN (max_num_seqs N),
legacy (the decode split-K rule before the chunked one: split_plan.SPLIT_RULE),
chunkN (chunked split-K, N key tiles a segment), splitwN (legacy, split below N programs per
SM, default 4), smalltiles (the prefill kernel's 128x64 tiles at every launch size). Each variant starts from the module's split-K defaults.
Needs `.devcarry/peers.py` (or ../shared/bench/peers.py) for the model configs. On an H200,
llama-8b: ~35 s per long64 variant, ~25 s per thr512 variant. One `RESULT {json}` per variant:
the phases (steps with prefill tokens, decode-only steps while prompts wait, the decode tail
after the last prefill), their step counts, milliseconds and tokens, and decode-only steps by
batch size. `--kernels START:COUNT` (the first variant only) also records steps START ..
START + COUNT - 1 with torch.profiler: their device time by kernel kind (the prefill attention's
Triton kernel and cuDNN's apart, the decode rows' attention, GEMMs, norms, copies, ...) and the
device's idle time, per step, beside those steps' tokens and wall time (long64's steps 20-27 are
prefill steps of ~8k tokens with ~30 decode rows riding: where a prefill step's ~260 ms go).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_llm(smoke: bool, model: str, max_model_len: int, **extra):
    """A dummy-weight engine (bf16, gpu_memory_utilization 0.85) of peers.py's `model` config
    at `max_model_len`; with `smoke` a tiny fp32 llama on the CPU instead. attn_engine.py's too."""
    from pagedserve import LLM
    if smoke:
        d = "/tmp/pagedserve_bench_smoke_model"
        os.makedirs(d, exist_ok=True)
        cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000,
                   max_position_embeddings=2048, rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
                   torch_dtype="float32", bos_token_id=1, eos_token_id=2, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        json.dump(cfg, open(f"{d}/config.json", "w"))
        return LLM(model=d, load_format="dummy", skip_tokenizer_init=True, dtype="float32", max_model_len=2048,
                   seed=0, **extra)
    sys.path.insert(0, os.path.join(REPO, ".devcarry"))
    sys.path.insert(0, os.path.join(REPO, "..", "shared", "bench"))
    from peers import make_model_dir
    d = make_model_dir(model)
    if max_model_len > 2048:
        cfg = json.load(open(f"{d}/config.json"))
        cfg["max_position_embeddings"] = max_model_len
        d = f"{d}-{max_model_len}"
        os.makedirs(d, exist_ok=True)
        json.dump(cfg, open(f"{d}/config.json", "w"))
    return LLM(model=d, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", max_model_len=max_model_len,
               gpu_memory_utilization=0.85, seed=0, **extra)


def thr_requests(smoke: bool, n: int = 512):
    """peers.py's thrN (seed 0)."""
    rng = random.Random(0)
    reqs = []
    for _ in range(16 if smoke else n):
        il, ol = rng.randint(64, 1024), rng.randint(16, 512)
        reqs.append(([rng.randrange(3, 32000) for _ in range(il)], ol))
    return [(p[:200], min(o, 8)) for p, o in reqs] if smoke else reqs


def long64_requests(smoke: bool):
    """peers_long.py's long64 (its rng: seed 1, 2000 warm-up draws first)."""
    rng = random.Random(1)
    [rng.randrange(3, 32000) for _ in range(2000)]
    lo, hi, count = (100, 400, 4) if smoke else (4096, 16384, 64)
    reqs = [([rng.randrange(3, 32000) for _ in range(rng.randint(lo, hi))], rng.randint(64, 256))
            for _ in range(count)]
    return [(p, 4) for p, _ in reqs] if smoke else reqs


class StepRecorder:
    """Wraps EngineCore._schedule: (time, prefill tokens, decode rows, waiting requests) per step;
    `on_step`, when set, is called before each step is scheduled (a profiler's step())."""

    def __init__(self, core) -> None:
        self.core, self.rows, self.on_step = core, [], None
        original = core._schedule

        def schedule():
            if self.on_step is not None:
                self.on_step()
            so = original()
            if so.total_num_scheduled_tokens:
                counts = list(so.num_scheduled_tokens.values())
                self.rows.append((time.perf_counter(), sum(n for n in counts if n > 1),
                                  sum(1 for n in counts if n == 1), len(core.scheduler.waiting)))
            return so
        core._schedule = schedule

    def summary(self, end: float) -> dict:
        rows = self.rows
        durations = [(rows[i + 1][0] if i + 1 < len(rows) else end) - rows[i][0] for i in range(len(rows))]
        last_prefill = max((i for i, r in enumerate(rows) if r[1]), default=-1)
        phases = {"prefill_steps": [], "decode_only_while_prefill_left": [], "decode_tail": []}
        for i, (row, dt) in enumerate(zip(rows, durations)):
            if row[1]:
                phases["prefill_steps"].append((row, dt))
            elif i < last_prefill:
                phases["decode_only_while_prefill_left"].append((row, dt))
            else:
                phases["decode_tail"].append((row, dt))
        out = {}
        for name, items in phases.items():
            total = sum(dt for _, dt in items)
            out[name] = dict(steps=len(items), s=round(total, 3),
                             ms_per_step=round(1e3 * total / len(items), 2) if items else None,
                             prefill_tokens=sum(r[1] for r, _ in items),
                             decode_tokens=sum(r[2] for r, _ in items),
                             mean_decode_rows=round(sum(r[2] for r, _ in items) / len(items), 1) if items else None)
        if name != "prefill_steps" and items:   # decode-only steps by batch size: (rows <=, steps, ms/step)
            buckets = {}
            for r, dt in items:
                edge = next(e for e in (1, 8, 32, 64, 128, 256, 512, 1 << 30) if r[2] <= e)
                n, t = buckets.get(edge, (0, 0.0))
                buckets[edge] = (n + 1, t + dt)
            out[name]["by_rows"] = [[e, n, round(1e3 * t / n, 2)] for e, (n, t) in sorted(buckets.items())]
        pre = phases["prefill_steps"]
        if pre:   # prefill steps by size: how full the token budget was
            sizes = sorted(r[1] + r[2] for r, _ in pre)
            out["prefill_step_tokens_p10_p50_p90"] = [sizes[len(sizes) // 10], sizes[len(sizes) // 2],
                                                      sizes[(9 * len(sizes)) // 10]]
            out["prefill_tok_s_in_prefill_steps"] = round(sum(r[1] for r, _ in pre) / sum(dt for _, dt in pre))
        return out


# kinds of a prefill step's kernels ahead of tp_profile.KINDS (first match wins)
PREFILL_KINDS = ((("prefill_attention",), "prefill_attention_triton"), (("sdpa",), "prefill_attention_cudnn"),
                 (("fmha",), "prefill_attention_cudnn"), (("flash",), "prefill_attention_cudnn"),
                 (("cudnn",), "prefill_attention_cudnn"), (("segment_merge",), "prefill_lse_merge"),
                 (("gather",), "gather"), (("copy_blocks",), "copy_blocks"))


def prefill_kind(name: str) -> str:
    from tp_profile import kernel_kind
    low = name.lower()
    return next((kind for keys, kind in PREFILL_KINDS if all(k in low for k in keys)), None) or kernel_kind(name)


def start_kernel_profile(recorder: StepRecorder, window: str, smoke: bool):
    """A torch.profiler recording steps START .. START + COUNT - 1 (recorder.on_step advances it)."""
    from torch.profiler import ProfilerActivity, profile, schedule
    start, count = (int(v) for v in window.split(":"))
    activities = [ProfilerActivity.CPU] if smoke else [ProfilerActivity.CUDA]
    # on_step runs before each schedule: profiler step k is the k-th scheduled step (row k - 1), so
    # rows START .. START + COUNT - 1 are its steps START + 1 ..; one warm-up step before them
    prof = profile(activities=activities, schedule=schedule(wait=start, warmup=1, active=count, repeat=1))
    prof.start()
    recorder.on_step = prof.step
    return prof


def kernel_profile(prof, recorder: StepRecorder, window: str, end: float) -> dict:
    """The profiled steps' device time by kernel kind and idle time (tp_profile.kernel_breakdown),
    their wall time and tokens (the recorder's rows), printed and returned."""
    from types import SimpleNamespace
    from tp_profile import kernel_breakdown
    from torch.autograd import DeviceType
    prof.stop()
    recorder.on_step = None
    start, count = (int(v) for v in window.split(":"))
    rows = recorder.rows
    times = [r[0] for r in rows] + [end]
    steps = [dict(prefill_tokens=rows[i][1], decode_rows=rows[i][2], wall_ms=round(1e3 * (times[i + 1] - times[i]), 2))
             for i in range(start, min(start + count, len(rows)))]
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA] or \
        [SimpleNamespace(name=e.name[6:], time_range=e.time_range)   # the CPU smoke run: ops, not kernels
         for e in prof.events() if e.name.startswith("aten::")]
    out = dict(window=window, steps=steps, **kernel_breakdown(events, max(len(steps), 1), prefill_kind))
    print(f"steps {window}: wall ms {[s['wall_ms'] for s in steps]}, prefill tokens "
          f"{[s['prefill_tokens'] for s in steps]}, decode rows {[s['decode_rows'] for s in steps]}", flush=True)
    for kind, us in out["busy_us_per_step"].items():
        print(f"  {kind:28s} {us / 1e3:9.2f} ms a step  {out['launches_per_step'][kind]:8.1f} launches", flush=True)
    print(f"  {'device idle':28s} {out['idle_us_per_step'] / 1e3:9.2f} ms a step", flush=True)
    by_name: dict = {}   # the heaviest kernels by name: which GEMM, which Triton variant
    for e in events:
        if e.name.startswith(("host:", "aten::", "nccl:")):
            continue
        slot = by_name.setdefault(e.name[:90], [0.0, 0])
        slot[0] += e.time_range.end - e.time_range.start
        slot[1] += 1
    n = max(len(steps), 1)
    out["top_kernels"] = [[name, round(us / n, 1), round(c / n, 2)]
                          for name, (us, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:20]]
    for name, us, c in out["top_kernels"]:
        print(f"    {us / 1e3:8.3f} ms {c:6.2f}x  {name}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="default,mbt16384")
    ap.add_argument("--workload", default="long64", choices=["long64", "thr512"])
    ap.add_argument("--model", default="llama-8b")
    ap.add_argument("--kernels", default="", help="START:COUNT: profile those steps of the first variant")
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args()
    from pagedserve import SamplingParams
    reqs = long64_requests(args.cpu_smoke) if args.workload == "long64" else thr_requests(args.cpu_smoke)
    max_model_len = 2048 if args.cpu_smoke or args.workload == "thr512" else 32768
    from pagedserve.attention import split_plan as sp
    from pagedserve.attention import triton_prefill_attention as tpf
    split_defaults = (sp.SPLIT_RULE, sp.CHUNK_TILES, sp.SPLIT_BELOW_PROGRAMS_PER_SM)
    large_min = tpf.LARGE_MIN_TOKENS
    for run, variant in enumerate(args.variants.split(",")):
        extra = {}
        sp.SPLIT_RULE, sp.CHUNK_TILES, sp.SPLIT_BELOW_PROGRAMS_PER_SM = split_defaults
        tpf.LARGE_MIN_TOKENS = large_min
        if variant.startswith("mbt"):
            extra["max_num_batched_tokens"] = int(variant[3:])
        elif variant.startswith("seqs"):
            extra["max_num_seqs"] = int(variant[4:])
        elif variant.startswith("splitw"):   # legacy split-K below N programs per SM (1: SMs filled once)
            sp.SPLIT_RULE, sp.SPLIT_BELOW_PROGRAMS_PER_SM = "legacy", int(variant[6:])
        elif variant == "legacy":
            sp.SPLIT_RULE = "legacy"
        elif variant.startswith("chunk"):
            sp.CHUNK_TILES = int(variant[5:])
        elif variant == "smalltiles":   # the prefill kernel's 128x64 tiles for every launch (before flash22)
            tpf.LARGE_MIN_TOKENS = 1 << 30
        elif variant != "default":
            raise SystemExit(f"unknown variant {variant}")
        t0 = time.perf_counter()
        llm = make_llm(args.cpu_smoke, args.model, max_model_len, **extra)
        startup = time.perf_counter() - t0
        params = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0, detokenize=False) for _, o in reqs]
        prompts = [{"prompt_token_ids": [3 + (p[0] + run) % 31990] + p[1:]} for p, _ in reqs]
        if args.workload == "thr512":   # peers.py warms up on the first 8
            llm.generate([{"prompt_token_ids": [4] + p[1:]} for p, _ in reqs[:8]], params[:8], use_tqdm=False)
        core = llm.engine.core
        recorder = StepRecorder(core)
        prof = start_kernel_profile(recorder, args.kernels, args.cpu_smoke) if args.kernels and run == 0 else None
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        end = time.perf_counter()
        if prof is not None:
            kernels = kernel_profile(prof, recorder, args.kernels, end)
        gen = sum(len(o.outputs[0].token_ids) for o in outs)
        assert gen == sum(o for _, o in reqs), (gen, sum(o for _, o in reqs))
        result = dict(workload=args.workload, model=args.model, variant=variant,
                      split_rule=f"{sp.SPLIT_RULE} chunk {sp.CHUNK_TILES}", startup_s=round(startup, 1), wall_s=round(end - t0, 2),
                      out_tok_s=round(gen / (end - t0), 1), steps=len(recorder.rows),
                      first_step_after_s=round(recorder.rows[0][0] - t0, 3) if recorder.rows else None)
        result.update(recorder.summary(end))
        if prof is not None:
            result["kernels"] = kernels
        print("RESULT " + json.dumps(result), flush=True)
        llm.shutdown()
        del llm, core, recorder
        import gc
        gc.collect()


if __name__ == "__main__":
    main()
