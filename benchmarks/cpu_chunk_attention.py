"""CPU prefill chunks' attention: chunk_attention (two flash calls with no mask, merged by their log-sum-exp) against
the one masked call it replaced, A/B in one process on one engine, alternating (session 58): a 6,000-token prompt
(1 token out), a 2,000-token prompt, and 16 prompts of 200-1,000 tokens with 16 tokens out each, at the offline
budget given. The "old" side is the masked call (torch_ref.cpu_flash_with_lse reporting no op). Run one process at a
time on a quiet machine:

    for b in 1024 512 2048; do .venv/bin/python benchmarks/cpu_chunk_attention.py $b 3; done
"""
from __future__ import annotations

import sys
import time

import pagedserve.attention.torch_ref as torch_ref
from cpu_budget import warm_engine   # benchmarks/ is the script's directory


def main(budget: int, rounds: int) -> None:
    llm, rng, prompt, params = warm_engine(budget)
    flash = torch_ref.cpu_flash_with_lse
    results: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            torch_ref.cpu_flash_with_lse = flash if side == "new" else (lambda: None)
            out = {}
            for name, n in (("long6000_s", 6000), ("p2000_s", 2000)):
                t = time.time()
                llm.generate([prompt(n)], [params(1)], use_tqdm=False)
                out[name] = round(time.time() - t, 2)
            prompts = [prompt(rng.randint(200, 1000)) for _ in range(16)]
            t = time.time()
            llm.generate(prompts, [params(16)] * 16, use_tqdm=False)
            out["batch16_s"] = round(time.time() - t, 2)
            results[side].append(out)
            print("budget", budget, side, out, flush=True)
    torch_ref.cpu_flash_with_lse = flash
    for side, runs in results.items():
        means = {key: round(sum(run[key] for run in runs) / len(runs), 2) for key in runs[0]}
        print("budget", budget, side, "mean", means, "min", {key: min(run[key] for run in runs) for key in runs[0]},
              flush=True)
    llm.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 3)
