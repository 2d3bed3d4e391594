"""The CPU token budget a step (max_num_batched_tokens) against prefill and batch speed, offline, on the embedded
default model (session 57): a 7,800-token prompt (1 token out), a 2,000-token prompt, and 32 prompts of 200-1,000
tokens with 32 tokens out each. One engine a budget; run one process at a time on a quiet machine:

    for b in 256 512 1024 2048; do .venv/bin/python benchmarks/cpu_budget.py $b; done
"""
from __future__ import annotations

import random
import sys
import time
from typing import Callable

from pagedserve import LLM, SamplingParams


def warm_engine(budget: int, **engine_args) -> tuple[LLM, random.Random, Callable[[int], dict],
                                                    Callable[[int], SamplingParams]]:
    """An engine at this budget (on the default model unless engine_args say otherwise) after one short request,
    the random source of its prompts, a maker of random n-token prompts, and of greedy n-token forced-length
    parameters."""
    llm = LLM(max_num_batched_tokens=budget, **engine_args)
    rng = random.Random(0)

    def prompt(n: int) -> dict:
        return {"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(n)]}

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, ignore_eos=True, temperature=0)

    llm.generate([prompt(300)], [params(4)], use_tqdm=False)   # warm-up
    return llm, rng, prompt, params


def main(budget: int) -> None:
    llm, rng, prompt, params = warm_engine(budget)
    res = {}
    t = time.time()
    llm.generate([prompt(7800)], [params(1)], use_tqdm=False)
    res["long7800_s"] = round(time.time() - t, 2)
    t = time.time()
    llm.generate([prompt(2000)], [params(1)], use_tqdm=False)
    res["p2000_s"] = round(time.time() - t, 2)
    prompts = [prompt(rng.randint(200, 1000)) for _ in range(32)]
    t = time.time()
    llm.generate(prompts, [params(32)] * 32, use_tqdm=False)
    dt = time.time() - t
    res["batch32_s"] = round(dt, 2)
    res["batch32_out_tok_s"] = round(32 * 32 / dt, 1)
    print("budget", budget, res, flush=True)
    llm.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]))
