"""Decode windows on a GPU (num_scheduler_steps): the same tokens as one step a schedule through
the CUDA graphs, in one engine whose scheduler's knob is flipped between two generate calls.
llama-1b with dummy weights (peers.py's config), 64 prompts of 16-200 tokens, each request 8-96
tokens ending by length (a row leaves its window at its last token, so every step's batch is the
same in both modes: bf16 results are then bit for bit), 56 greedy rows and 8 seeded top-p rows.
Usage: PYTHONPATH=$PWD python3 benchmarks/window_gpu.py [K]   (K default 4; peers.py beside it or in .devcarry)"""
import os
import random
import sys
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", ".devcarry"), "/work/shared/bench"]
from peers import make_model_dir  # noqa: E402

from pagedserve import LLM, SamplingParams  # noqa: E402


def main() -> None:
    k = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    llm = LLM(model=make_model_dir("llama-1b"), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=2048, gpu_memory_utilization=0.85, seed=0)
    rng = random.Random(1)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 32000) for _ in range(rng.randint(16, 200))]} for _ in range(64)]
    lengths = [rng.randint(8, 96) for _ in range(64)]
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False) for n in lengths[:56]]
    params += [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.8, top_p=0.9, seed=i, detokenize=False)
               for i, n in enumerate(lengths[56:])]
    scheduler = llm.engine.core.scheduler
    ids = {}
    for steps in (1, k, 1, k):
        scheduler.num_scheduler_steps = steps
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        ids.setdefault(steps, []).append([o.outputs[0].token_ids for o in outs])
        print(f"num_scheduler_steps {steps}: {sum(len(o.outputs[0].token_ids) for o in outs)} tokens in {dt:.3f} s",
              flush=True)
    single, window = ids[1][0], ids[k][0]
    print(f"RESULT window parity K={k}: greedy {sum(a == b for a, b in zip(single[:56], window[:56]))}/56 identical, "
          f"seeded top-p {sum(a == b for a, b in zip(single[56:], window[56:]))}/8; repeat runs identical: "
          f"{ids[1][0] == ids[1][1]} / {ids[k][0] == ids[k][1]}", flush=True)


if __name__ == "__main__":
    main()
