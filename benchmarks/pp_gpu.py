"""Pipeline parallelism on a multi-GPU machine (issue 17): checks and figures next to TP.
  python3 benchmarks/pp_gpu.py exact                 tiny fp32 llama: PP=2 greedy ids == PP=1 (chunked
                                                     prefill + preemption, as tests/unit/test_pipeline_parallel)
  python3 benchmarks/pp_gpu.py ids TP PP OUT.json    llama-8b dummy bf16: greedy ids of 32 prompts x 64 tokens
  python3 benchmarks/pp_gpu.py compare A.json B.json
  python3 benchmarks/pp_gpu.py peers TP PP           thr512 and b1_decode (peers.py workloads)
Needs ../shared/bench/peers.py in .devcarry/ (as tp_gpu.py). ENFORCE_EAGER=1: no CUDA graphs
(PP stages run eagerly anyway)."""
import json
import os
import sys
import tempfile
import time

sys.path[:0] = [".devcarry", "../shared/bench"]


def make_llm(tp: int, pp: int):
    from pagedserve import LLM
    from peers import emit, make_model_dir
    t0 = time.time()
    llm = LLM(model=make_model_dir("llama-8b"), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=2048, gpu_memory_utilization=0.85, seed=0, tensor_parallel_size=tp,
              pipeline_parallel_size=pp, enforce_eager=os.environ.get("ENFORCE_EAGER") == "1")
    emit(engine="pagedserve", model="llama-8b", tp=tp, pp=pp, startup_s=round(time.time() - t0, 1))
    return llm


def exact() -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from pagedserve import LLM, SamplingParams
    from peers import emit
    path = tempfile.mkdtemp()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    g = torch.Generator().manual_seed(2)
    prompts = [{"prompt_token_ids": torch.randint(0, 512, (n,), generator=g).tolist()}
               for n in torch.randint(3, 41, (6,), generator=g).tolist()]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ids = {}
    for pp, extra in ((1, {}), (2, dict(max_num_batched_tokens=32, num_kv_blocks=9))):
        llm = LLM(model=path, device="cuda", dtype="float32", skip_tokenizer_init=True, max_model_len=128,
                  pipeline_parallel_size=pp, **extra)
        ids[pp] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        preemptions = llm.engine.core.scheduler.stats.num_preemptions
        llm.shutdown()
    emit(workload="pp2_vs_pp1_fp32_tiny", identical=ids[1] == ids[2], preemptions=preemptions)


def main() -> None:
    from pagedserve import SamplingParams
    from peers import emit, workload
    mode = sys.argv[1]
    if mode == "exact":
        return exact()
    if mode == "compare":
        a, b = (json.load(open(p)) for p in sys.argv[2:4])
        same = sum(x == y for x, y in zip(a, b))
        emit(workload="ids_compare", a=sys.argv[2], b=sys.argv[3], prompts=len(a), identical=same,
             token_agreement=round(sum(s == t for x, y in zip(a, b) for s, t in zip(x, y)) / sum(len(x) for x in a), 4))
        return
    tp, pp = int(sys.argv[2]), int(sys.argv[3])
    llm = make_llm(tp, pp)
    if mode == "ids":
        prompts = [{"prompt_token_ids": p[:256]} for p, _ in workload(32, seed=7)]
        sp = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0.0, detokenize=False)
        json.dump([o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)], open(sys.argv[4], "w"))
    else:
        from peers_thr import run_thr
        outs, dt = run_thr(llm)
        gen = sum(len(o.outputs[0].token_ids) for o in outs)
        emit(engine="pagedserve", model="llama-8b", tp=tp, pp=pp, workload="thr512", wall_s=round(dt, 2),
             req_s=round(512 / dt, 2), out_tok_s=round(gen / dt, 1))
        p = {"prompt_token_ids": list(range(100, 228))}
        sp = SamplingParams(max_tokens=256, ignore_eos=True, temperature=0.0, detokenize=False)
        llm.generate([p], [sp], use_tqdm=False)
        t0 = time.time()
        llm.generate([p], [sp], use_tqdm=False)
        emit(engine="pagedserve", model="llama-8b", tp=tp, pp=pp, workload="b1_decode",
             tok_s=round(256 / (time.time() - t0), 1))
    llm.shutdown()


if __name__ == "__main__":
    main()
