"""CPU batch-1 decode under OpenMP wait policies, quiet and oversubscribed (issue 19).

On a 2-core machine busy with other processes, a 2-thread OpenMP team waits at every barrier
for a partner the kernel has descheduled: libgomp's default spins ~300k iterations first, so
a step's hundreds of parallel regions each cost a time slice. Measured here: the default
model's decode on the development VM at load ~9 ran at 0.5-10 tok/s on the default policy and
40-44 with OMP_WAIT_POLICY=PASSIVE. This script times one prompt's greedy decode of a
SmolLM2-135M-shaped dummy model (fp32, torch's CPU path) pinned to 2 cores, in a fresh
process per (policy, load) pair, so the wait policy is read at start-up.

    python3 benchmarks/omp_wait.py [--cores 0,1] [--tokens 96]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
              intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
              max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5, hidden_act="silu",
              tie_word_embeddings=True, torch_dtype="float32", bos_token_id=1, eos_token_id=2)
POLICIES = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin2000": {"GOMP_SPINCOUNT": "2000"}}


def child(model_dir: str, tokens: int) -> None:
    import torch
    from pagedserve import LLM, SamplingParams
    torch.set_num_threads(2)
    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, device="cpu", dtype="float32",
              max_model_len=512, seed=0)
    sp = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0, detokenize=False)
    prompt = {"prompt_token_ids": list(range(100, 164))}
    llm.generate([prompt], sp, use_tqdm=False)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        llm.generate([prompt], sp, use_tqdm=False)
        best = max(best, tokens / (time.perf_counter() - t0))
    print(json.dumps(dict(tok_s=round(best, 1))), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cores", default="0,1")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--hogs", type=int, default=4, help="busy processes on the same cores for the loaded runs")
    ap.add_argument("--child", default="")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.tokens)
    model_dir = tempfile.mkdtemp(prefix="omp_wait_")
    json.dump(CONFIG, open(os.path.join(model_dir, "config.json"), "w"))
    cores = [int(c) for c in args.cores.split(",")]
    for load in (0, args.hogs):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
        for h in hogs:
            os.sched_setaffinity(h.pid, cores)
        try:
            for name, env in POLICIES.items():
                cmd = ["taskset", "-c", args.cores, sys.executable, __file__, "--child", model_dir,
                       "--tokens", str(args.tokens)]
                out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
                line = next((x for x in out.stdout.splitlines() if x.startswith("{")), None)
                res = json.loads(line) if line else dict(error=out.stderr[-300:])
                print("RESULT " + json.dumps(dict(policy=name, hogs=load, cores=args.cores, **res)), flush=True)
        finally:
            for h in hogs:
                h.kill()


if __name__ == "__main__":
    main()
