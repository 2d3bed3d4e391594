"""Issue 19: batch-1 CPU decode of the default model's shape, two checkouts in turns (A/B), at
1 and 2 threads, pinned to 2 cores of an otherwise idle host: where the development VM's
2-thread figures drown in the other helpers' load, this gives a quiet 1 -> 2 thread scaling.

Weights: load_format="dummy" on a copy of the default model's config.json + gguf_quant.json
(Q4_1 layers, Q8_0 embedding / LM head), random blocks whose fp16 scales are then set to small
finite values (random bits hold NaN / Inf scales); the kernels' speed does not depend on the
values. Each (checkout, round) is a fresh process that times `--steps` greedy decode steps after
a 128-token prompt at 2, 1, 2, 1 threads (tok/s, best of the two at each), plus the checkout's
per-phase stack timing at 2 threads where it has one (DecodeStack.set_profile).

    python benchmarks/cpu_decode_ab.py --model DIR|default --checkout A=PATH --checkout B=PATH
        [--cores 2,3] [--rounds 3] [--steps 64] [--out DIR]
(a checkout PATH holds the `pagedserve` package; its C++ extension builds on first use)"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def fix_scales(layer, fmt: str) -> None:
    """Small finite fp16 scales (and Q4_1 offsets) in random blocks: rows stay O(1)."""
    import torch
    raw = layer.qweight.data
    gen = torch.Generator().manual_seed(raw.shape[0] * 7 + raw.shape[1])
    d = (torch.rand(raw.shape[:2], generator=gen) * 0.02 + 0.005).half()
    raw[..., 0:2] = d.view(torch.uint8).view(*raw.shape[:2], 2)
    if fmt == "Q4_1":
        raw[..., 2:4] = (-8 * d).view(torch.uint8).view(*raw.shape[:2], 2)


def child(args) -> None:
    import random
    import torch
    import pagedserve.layers.quantization.gguf as gguf
    from pagedserve import LLM, SamplingParams
    repack = gguf._repack

    def fixed(layer, fmt, *a, **k):
        fix_scales(layer, fmt)
        return repack(layer, fmt, *a, **k)
    gguf._repack = fixed
    from pagedserve.layers.quantization.base import CheckpointTensor
    from pagedserve.models.llama import LlamaForCausalLM
    shapes = LlamaForCausalLM.checkpoint_shapes

    def with_packed_embedding(self):   # dummy weights name the float embedding only
        out = shapes(self)
        embed = self.model.embed_tokens
        if hasattr(embed, "qweight"):
            out["model.embed_tokens.qweight"] = CheckpointTensor(tuple(embed.qweight.shape), torch.uint8)
        return out
    LlamaForCausalLM.checkpoint_shapes = with_packed_embedding
    if args.model == "default":   # the default model's real weights (where it is cached)
        gguf._repack = repack
        llm = LLM(max_model_len=1024, seed=0)
    else:
        llm = LLM(model=args.model, load_format="dummy", skip_tokenizer_init=True, device="cpu",
                  max_model_len=1024, seed=0)
    rng = random.Random(0)
    prompt = {"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(128)]}
    sp = SamplingParams(max_tokens=args.steps + 1, ignore_eos=True, temperature=0.0, detokenize=False)
    one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0, detokenize=False)
    stack = []
    fused = gguf.cpu_decode_stack

    def seen(layers, *a):
        stack[:] = [layers[0].__dict__.get("_gguf_decode_stack", (None, None))[1]]
        return fused(layers, *a)
    import pagedserve.models.llama as llama
    llama.cpu_decode_stack = seen
    llm.generate([prompt], sp, use_tqdm=False)
    out = dict(tok_s={1: [], 2: []}, cpu_ms={1: [], 2: []}, ids=None)   # cpu_ms: process CPU time a step
    for threads in (2, 1, 2, 1):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        llm.generate([prompt], one, use_tqdm=False)
        prefill = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        res = llm.generate([prompt], sp, use_tqdm=False)
        out["tok_s"][threads].append(round(args.steps / (time.perf_counter() - t0 - prefill), 1))
        out["cpu_ms"][threads].append(round((time.process_time() - c0) / args.steps * 1e3, 2))
        out["ids"] = res[0].outputs[0].token_ids[:8]
    st = stack[0] if stack else None
    if st is not None and hasattr(st, "set_profile"):
        torch.set_num_threads(2)
        st.set_profile(True)
        llm.generate([prompt], sp, use_tqdm=False)
        times, runs, wall_us = st.timings()
        st.set_profile(False)
        per = (times / runs).tolist()
        out["phases_2t"] = dict(runs=runs, stack_us=round(wall_us / runs, 1),
                                work_wait_chunks=[[[round(v, 1) for v in k] for k in t] for t in per])
    print("CHILD " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a config.json + gguf_quant.json folder (dummy weights), "
                    "or 'default': the default model")
    ap.add_argument("--checkout", action="append", required=True, help="NAME=PATH")
    ap.add_argument("--cores", default="2,3")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child(args)
    checkouts = dict(c.split("=", 1) for c in args.checkout)
    env0 = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    # the extensions build first, in parallel (not pinned)
    builds = {name: subprocess.Popen([sys.executable, "-c", "from pagedserve.layers.quantization import gguf_cpu; "
                                      "assert gguf_cpu._load() is not None"],
                                     env={**env0, "PYTHONPATH": os.path.abspath(path)}, cwd=os.path.abspath(path))
              for name, path in checkouts.items()}
    t0 = time.perf_counter()
    for name, p in builds.items():
        rc = p.wait()
        print(f"build {name}: rc {rc} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if rc:   # without the extension the GGUF layers take torch's int4 path: nothing to compare
            sys.exit(f"the C++ extension of {name} did not build")
    results = []
    for r in range(args.rounds):
        for name, path in checkouts.items():
            model = args.model if args.model == "default" else os.path.abspath(args.model)
            cmd = ["taskset", "-c", args.cores, sys.executable, os.path.abspath(__file__), "--child", "--model",
                   model, "--checkout", f"{name}={path}", "--steps", str(args.steps)]
            t = time.perf_counter()
            p = subprocess.run(cmd, env={**env0, "PYTHONPATH": os.path.abspath(path)}, cwd=os.path.abspath(path),
                               capture_output=True, text=True, timeout=400)
            line = next((x for x in p.stdout.splitlines() if x.startswith("CHILD ")), None)
            res = json.loads(line[6:]) if line else dict(error=(p.stdout + p.stderr)[-1500:])
            res.update(checkout=name, round=r, wall_s=round(time.perf_counter() - t, 1),
                       load_1m=round(os.getloadavg()[0], 2))
            results.append(res)
            print("RESULT " + json.dumps({k: v for k, v in res.items() if k != "phases_2t"}), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cpu_decode_ab.json"), "w") as f:
            json.dump(dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cores=args.cores,
                           cpu=_cpu_name(), results=results), f, indent=1)
    print("SUMMARY (tok/s, best per round; 1 thread | 2 threads; ratio 2t/1t)")
    for name in checkouts:
        rs = [x for x in results if x["checkout"] == name and "tok_s" in x]
        one = [max(x["tok_s"]["1"]) for x in rs]
        two = [max(x["tok_s"]["2"]) for x in rs]
        print(f"  {name}: 1t {one} | 2t {two} | 2t/1t {[round(b / a, 2) for a, b in zip(one, two)]}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


if __name__ == "__main__":
    main()
