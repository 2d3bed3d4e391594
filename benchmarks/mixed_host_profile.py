"""Host cost of a MIXED step (one new prompt's prefill chunk + the running decodes) against an
all-decode step (issue 22), on the CPU with a llama-8b-SHAPED model of tiny dims (32 layers,
hidden 64), so the model's compute is small and what is left is the host's work: Python,
per-op dispatch, input building. Prints the runner's time split (build_step_inputs, the
forward, logits + sampling) per step kind, the aten ops per forward, and a cProfile of the
mixed steps' forward (top entries by own time).

    PYTHONPATH=$PWD python3 benchmarks/mixed_host_profile.py [--decodes 24] [--prompt 544] [--reps 6]

Steps: `--decodes` requests decoding, then `--reps` times a fresh prompt of `--prompt` tokens
is added (half of them sharing the previous prompt's first half: cached context); the step
that prefills it is a mixed step, the next one an all-decode step.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def tiny_8b_shaped(path: str, layers: int, hidden: int) -> str:
    os.makedirs(path, exist_ok=True)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=1024, max_position_embeddings=4096,
               rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu", torch_dtype="float32", bos_token_id=1,
               eos_token_id=2, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


class Timers:
    """Wraps the runner's phases; `seconds[name]` accumulates the current step's time in each."""

    def __init__(self, runner) -> None:
        import pagedserve.worker.model_runner as mr
        self.seconds: dict[str, float] = {}
        mr.build_step_inputs = self._timed("inputs", mr.build_step_inputs)
        runner.model.forward = self._timed("forward", runner.model.forward)
        runner.model.compute_logits = self._timed("logits", runner.model.compute_logits)
        mr.sample = self._timed("sample", mr.sample)

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decodes", type=int, default=24)
    ap.add_argument("--prompt", type=int, default=544)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile
    from pagedserve import LLM, SamplingParams
    torch.set_num_threads(1)
    path = tiny_8b_shaped("/tmp/pagedserve_mixed_host_model", args.layers, args.hidden)
    llm = LLM(model=path, load_format="dummy", skip_tokenizer_init=True, dtype="float32", max_model_len=4096,
              seed=0, max_num_batched_tokens=2048, enforce_eager=True)
    engine = llm.engine
    runner = engine.core.executor.runner
    timers = Timers(runner)
    gen = torch.Generator().manual_seed(0)
    sp = SamplingParams(max_tokens=100000, ignore_eos=True, temperature=0.0, detokenize=False)
    for i in range(args.decodes):
        engine.add_request(f"d{i}", {"prompt_token_ids": torch.randint(3, 1000, (40,), generator=gen).tolist()}, sp)
    while engine.core.scheduler.waiting or any(not r.output_token_ids for r in engine.core.scheduler.running):
        engine.step()
    for _ in range(4):
        engine.step()
    kinds: dict[str, list[dict[str, float]]] = {"mixed": [], "mixed_cached": [], "decode": []}
    prof = cProfile.Profile()
    ops: dict[str, int] = {}
    one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0, detokenize=False)
    prev = torch.randint(3, 1000, (args.prompt,), generator=gen).tolist()
    for rep in range(args.reps):
        cached = rep % 2 == 1
        fresh = torch.randint(3, 1000, (args.prompt,), generator=gen).tolist()
        prompt = prev[:args.prompt // 2] + fresh[args.prompt // 2:] if cached else fresh
        prev = prompt
        engine.add_request(f"p{rep}", {"prompt_token_ids": prompt}, one)
        for kind in ("mixed_cached" if cached else "mixed", "decode"):
            timers.seconds = {}
            if kind != "decode" and 2 <= rep < args.reps - 1:
                prof.enable()
            if rep == args.reps - 1:   # aten ops per forward, of the last mixed and decode steps
                with profile(activities=[ProfilerActivity.CPU]) as p:
                    t0 = time.perf_counter()
                    engine.step()
                    wall = time.perf_counter() - t0
                ops[kind] = sum(e.count for e in p.key_averages() if e.key.startswith("aten::"))
            else:
                t0 = time.perf_counter()
                engine.step()
                wall = time.perf_counter() - t0
            prof.disable()
            kinds[kind].append(dict(timers.seconds, step=wall))
    rows = []
    for kind, steps in kinds.items():
        steps = steps[1:] if len(steps) > 2 else steps   # the first of each: warm-up
        med = {k: statistics.median(s.get(k, 0.0) for s in steps) * 1e3 for k in ("step", "inputs", "forward",
                                                                                 "logits", "sample")}
        rows.append(dict(kind=kind, n=len(steps), **{f"{k}_ms": round(v, 3) for k, v in med.items()},
                         forward_per_layer_us=round(med["forward"] / args.layers * 1e3, 1)))
    for row in rows:
        print("RESULT " + json.dumps(row))
    print("aten ops per step (profiled steps):", json.dumps(ops))
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue())


if __name__ == "__main__":
    main()
