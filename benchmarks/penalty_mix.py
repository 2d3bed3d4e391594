"""What one request with penalties costs every other request (issue 22's thr512 workload; the
project's rule that no request may slow another): peers.py's thr512 (llama dummy weights, input
U[64, 1024], output U[16, 512], greedy) run in one process on one engine as

  base  every request plain greedy
  one   the request of the most output tokens with frequency_penalty 0.5 (greedy still), the
        other 511 plain
  all   every request with frequency_penalty 0.5 and repetition_penalty 1.1
  sampled  every request sampled: temperature 0.8, top_p 0.95 (what serving clients send)
  sampled_k  temperature 0.8, top_k 50, top_p 0.95
  min_p  temperature 0.8, min_p 0.05

and the out tok/s of each (one warm-up of 8 requests first; `--rounds` interleaved rounds).
`one` against `base` is the cost a penalised request puts on the others.

Usage (device; peers.py copied into the git-ignored .devcarry/):
  [TREE=.devcarry/main] python3 benchmarks/penalty_mix.py [--model llama-1b] [--rounds 2] [--n 512] [--profile all]
Prints one `RESULT {json}` line per run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

# TREE: the pagedserve tree to import (an A/B stages the old one in .devcarry/main)
sys.path[:0] = [os.environ.get("TREE", "."), ".devcarry", os.path.join(os.path.dirname(os.path.abspath(".")), "shared", "bench")]


SAMPLED = ("sampled", "sampled_k", "min_p")


def selfcheck() -> None:
    """On the GPU: penalties and bad words of rows whose latest token is still on the device
    (async placeholders: the OutputHistory holds it, bans wait on prev_sampled) equal those of
    the same outputs known on the host (tests/unit/test_penalties.py and test_bad_words.py's
    cases, on CUDA tensors)."""
    import torch
    from pagedserve.layers.sampler import apply_bias_and_min_tokens, apply_penalties
    from pagedserve.sampling_params import SamplingParams
    from pagedserve.worker.input_batch import CachedRequestState
    from pagedserve.worker.output_history import OutputHistory
    from pagedserve.worker.sampling_inputs import build_sampling_tensors
    dev, vocab = torch.device("cuda"), 128256
    history = OutputHistory(dev)

    def state(params, outputs):
        s = CachedRequestState("r", [3, 50, 60], 3, params, [0], 3)
        s.token_ids += outputs
        history.add(s)
        return s

    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), SamplingParams(repetition_penalty=1.4)]
    for p in params:
        p._bad_words_token_ids = [[5], [10, 20], [30, 31, 32]]
    histories = [[3, 3, 10], [30, 31]]
    pending = [state(p, h[:-1]) for p, h in zip(params, histories)]
    prev = torch.tensor([h[-1] for h in histories], device=dev)
    history.append(pending, prev)
    for s in pending:
        s.pending_pos, s.sampled_row = len(s.token_ids), pending.index(s)
        s.token_ids.append(-1)
    logits = torch.randn(2, vocab, device=dev)
    a_t = build_sampling_tensors(pending, vocab, dev, (2,), prev, history)
    b_t = build_sampling_tensors([state(p, h) for p, h in zip(params, histories)], vocab, dev, (2,), None, history)
    a = apply_penalties(apply_bias_and_min_tokens(logits.clone(), a_t), a_t)
    b = apply_penalties(apply_bias_and_min_tokens(logits.clone(), b_t), b_t)
    ok = torch.equal(a, b) and bool(torch.isneginf(a[0, 20])) and bool(torch.isneginf(a[1, 32]))
    print("RESULT " + json.dumps(dict(selfcheck="placeholder penalties and bans on cuda", equal=ok)), flush=True)


def main() -> None:
    if "--selfcheck" in sys.argv:
        selfcheck()
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--kinds", default="base,one,all")
    ap.add_argument("--profile", default="", help="after the rounds, run this kind once under cProfile and print "
                                                   "the functions of the most own and cumulative time")
    args = ap.parse_args()
    from peers import make_model_dir, workload
    from pagedserve import LLM, SamplingParams
    llm = LLM(model=make_model_dir(args.model), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=2048, gpu_memory_utilization=0.85, seed=0)
    reqs = workload(args.n)
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]

    longest = max(range(len(reqs)), key=lambda i: reqs[i][1])   # alive for the whole run

    def params(kind: str) -> list:
        out = []
        for i, (_, o) in enumerate(reqs):
            extra = {}
            if kind == "sampled":
                extra = dict(top_p=0.95)
            elif kind == "sampled_k":
                extra = dict(top_k=50, top_p=0.95)
            elif kind == "min_p":
                extra = dict(min_p=0.05)
            elif kind == "all" or (kind == "one" and i == longest):
                extra = dict(frequency_penalty=0.5)
                if kind == "all":
                    extra["repetition_penalty"] = 1.1
            out.append(SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.8 if kind in SAMPLED else 0.0,
                                      detokenize=False, **extra))
        return out

    llm.generate(prompts[:8], params("all")[:8], use_tqdm=False)
    for r in range(args.rounds):
        for kind in args.kinds.split(","):
            sps = params(kind)
            t0 = time.time()
            outs = llm.generate(prompts, sps, use_tqdm=False)
            dt = time.time() - t0
            gen = sum(len(o.outputs[0].token_ids) for o in outs)
            # the ids' digest: the old (lockstep) and new trees' should match where the batches do
            digest = hashlib.sha256(json.dumps([o.outputs[0].token_ids for o in outs]).encode()).hexdigest()[:16]
            print("RESULT " + json.dumps(dict(tree=os.environ.get("TREE", "."), model=args.model, kind=kind, round=r,
                                              wall_s=round(dt, 2), out_tok_s=round(gen / dt, 1), ids=digest)),
                  flush=True)
    if args.profile:
        import cProfile
        import pstats
        sps = params(args.profile)
        with cProfile.Profile() as prof:
            t0 = time.time()
            llm.generate(prompts, sps, use_tqdm=False)
        print(f"PROFILE {args.profile}: wall {time.time() - t0:.2f} s under cProfile", flush=True)
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
