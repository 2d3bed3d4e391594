"""Tensor parallelism on a multi-GPU machine (issue 9): llama-8b dummy weights, same seed.
  python3 benchmarks/tp_gpu.py ids TP OUT.json   greedy ids of 32 prompts x 64 tokens
  python3 benchmarks/tp_gpu.py peers TP          thr512 and b1_decode (peers.py workloads)
  python3 benchmarks/tp_gpu.py compare A.json B.json
Set ENFORCE_EAGER=1 to run without CUDA graphs, PP=N for N pipeline stages (benchmarks/pp_gpu.sh)."""
import json
import os
import sys
import time

sys.path.insert(0, ".devcarry")
from peers import emit, make_model_dir, workload  # noqa: E402
from peers_thr import run_thr  # noqa: E402

PP = int(os.environ.get("PP", "1"))


def make_llm(tp: int):
    from pagedserve import LLM
    t0 = time.time()
    llm = LLM(model=make_model_dir("llama-8b"), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=2048, gpu_memory_utilization=0.85, seed=0, tensor_parallel_size=tp,
              pipeline_parallel_size=PP, enforce_eager=os.environ.get("ENFORCE_EAGER") == "1")
    emit(engine="pagedserve", model="llama-8b", tp=tp, pp=PP, startup_s=round(time.time() - t0, 1))
    return llm


def main() -> None:
    from pagedserve import SamplingParams
    mode = sys.argv[1]
    if mode == "compare":
        a, b = (json.load(open(p)) for p in sys.argv[2:4])
        same = sum(x == y for x, y in zip(a, b))
        prefix = [next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x)) for x, y in zip(a, b)]
        emit(workload="tp2_vs_tp1_ids", prompts=len(a), identical=same, match_rate=round(same / len(a), 3),
             mean_common_prefix=round(sum(prefix) / len(prefix), 1), token_agreement=round(
                 sum(s == t for x, y in zip(a, b) for s, t in zip(x, y)) / sum(len(x) for x in a), 4))
        return
    tp = int(sys.argv[2])
    llm = make_llm(tp)
    if mode == "ids":
        reqs = workload(32, seed=7)
        prompts = [{"prompt_token_ids": p[:256]} for p, _ in reqs]
        sp = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0.0, detokenize=False)
        outs = llm.generate(prompts, sp, use_tqdm=False)
        json.dump([o.outputs[0].token_ids for o in outs], open(sys.argv[3], "w"))
    else:
        outs, dt = run_thr(llm)
        gen = sum(len(o.outputs[0].token_ids) for o in outs)
        emit(engine="pagedserve", model="llama-8b", tp=tp, pp=PP, workload="thr512", wall_s=round(dt, 2),
             req_s=round(512 / dt, 2), out_tok_s=round(gen / dt, 1))
        p = {"prompt_token_ids": list(range(100, 228))}
        sp = SamplingParams(max_tokens=256, ignore_eos=True, temperature=0.0, detokenize=False)
        llm.generate([p], [sp], use_tqdm=False)
        t0 = time.time()
        llm.generate([p], [sp], use_tqdm=False)
        emit(engine="pagedserve", model="llama-8b", tp=tp, pp=PP, workload="b1_decode",
             tok_s=round(256 / (time.time() - t0), 1))
    llm.shutdown()


if __name__ == "__main__":
    main()
