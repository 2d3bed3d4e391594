"""Sampled decode on the CPU: the default model (its GGUF, CPU), `--batch` prompts x `--tokens`
output tokens (ignore_eos), greedy, temperature 0.8 / top_p 0.9 and temperature 0.8 / min_p 0.05
(llama.cpp's default min_p), out tok/s of each
(after one warm-up generate). TREE: the pagedserve checkout to import (an A/B puts the old one
beside: `git archive OLD pagedserve | tar -x -C DIR`).

    [TREE=DIR] python benchmarks/cpu_sampling.py [--batch 32] [--tokens 48] [--rounds 2]
Prints one `RESULT {json}` line per run."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.environ.get("TREE", os.getcwd()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from pagedserve import LLM, SamplingParams
    llm = LLM(device="cpu")
    prompts = [f"Story number {i}: once upon a time" for i in range(args.batch)]
    kinds = {"greedy": dict(temperature=0.0), "top_p": dict(temperature=0.8, top_p=0.9),
             "min_p": dict(temperature=0.8, min_p=0.05)}
    llm.generate(prompts[:4], SamplingParams(max_tokens=4), use_tqdm=False)
    for r in range(args.rounds):
        for kind, extra in kinds.items():
            params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, **extra)
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            print("RESULT " + json.dumps(dict(tree=os.environ.get("TREE", "."), kind=kind, round=r, batch=args.batch,
                                              wall_s=round(wall, 2), out_tok_s=round(tokens / wall, 1))), flush=True)


if __name__ == "__main__":
    main()
