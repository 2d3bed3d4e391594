"""Where long64's wall time goes (issue 22): peers_long.py's long64 workload (64 requests, input
4k-16k, output 64-256, llama-8b dummy, max_model_len 32768) with every scheduled step recorded:
its prefill tokens, its decode rows and the time to the next step's schedule (under async
scheduling that is the device time of a step, once the pipeline is full).

    PYTHONPATH=$PWD python3 benchmarks/long64_profile.py [--variants default,mbt16384] [--cpu-smoke]

Needs `.devcarry/peers.py` (or ../shared/bench/peers.py) for the llama-8b config. ~35 s per
variant on an H200 (start-up ~8 s, the run ~26 s). Prints one `RESULT {json}` per variant: the
phases (steps with prefill tokens, decode-only steps while prompts wait, the decode tail after
the last prefill), their step counts, milliseconds and tokens.
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


def make_llm(smoke: bool, **extra):
    from pagedserve import LLM
    if smoke:
        d = "/tmp/long64_smoke_model"
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
    d = make_model_dir("llama-8b")
    cfg = json.load(open(f"{d}/config.json"))
    cfg["max_position_embeddings"] = 32768
    d = d + "-32k"
    os.makedirs(d, exist_ok=True)
    json.dump(cfg, open(f"{d}/config.json", "w"))
    return LLM(model=d, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", max_model_len=32768,
               gpu_memory_utilization=0.85, seed=0, **extra)


def long64_requests(smoke: bool):
    """peers_long.py's long64 (its rng: seed 1, 2000 warm-up draws first)."""
    rng = random.Random(1)
    [rng.randrange(3, 32000) for _ in range(2000)]
    lo, hi, count = (100, 400, 8) if smoke else (4096, 16384, 64)
    reqs = [([rng.randrange(3, 32000) for _ in range(rng.randint(lo, hi))], rng.randint(64, 256))
            for _ in range(count)]
    return [(p, 8) for p, _ in reqs] if smoke else reqs


class StepRecorder:
    """Wraps EngineCore._schedule: (time, prefill tokens, decode rows, waiting requests) per step."""

    def __init__(self, core) -> None:
        self.core, self.rows = core, []
        original = core._schedule

        def schedule():
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
        pre = phases["prefill_steps"]
        if pre:   # prefill steps by size: how full the token budget was
            sizes = sorted(r[1] + r[2] for r, _ in pre)
            out["prefill_step_tokens_p10_p50_p90"] = [sizes[len(sizes) // 10], sizes[len(sizes) // 2],
                                                      sizes[(9 * len(sizes)) // 10]]
            out["prefill_tok_s_in_prefill_steps"] = round(sum(r[1] for r, _ in pre) / sum(dt for _, dt in pre))
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="default,mbt16384")
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args()
    from pagedserve import SamplingParams
    reqs = long64_requests(args.cpu_smoke)
    for run, variant in enumerate(args.variants.split(",")):
        extra = {}
        if variant.startswith("mbt"):
            extra["max_num_batched_tokens"] = int(variant[3:])
        elif variant != "default":
            raise SystemExit(f"unknown variant {variant}")
        t0 = time.perf_counter()
        llm = make_llm(args.cpu_smoke, **extra)
        startup = time.perf_counter() - t0
        core = llm.engine.core
        recorder = StepRecorder(core)
        params = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0, detokenize=False) for _, o in reqs]
        prompts = [{"prompt_token_ids": [3 + (p[0] + run) % 31990] + p[1:]} for p, _ in reqs]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        end = time.perf_counter()
        gen = sum(len(o.outputs[0].token_ids) for o in outs)
        assert gen == sum(o for _, o in reqs), (gen, sum(o for _, o in reqs))
        result = dict(variant=variant, startup_s=round(startup, 1), wall_s=round(end - t0, 2),
                      out_tok_s=round(gen / (end - t0), 1), steps=len(recorder.rows),
                      first_step_after_s=round(recorder.rows[0][0] - t0, 3) if recorder.rows else None)
        result.update(recorder.summary(end))
        print("RESULT " + json.dumps(result), flush=True)
        llm.shutdown()
        del llm, core, recorder
        import gc
        gc.collect()


if __name__ == "__main__":
    main()
