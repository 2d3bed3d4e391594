"""Pipeline parallelism on GPU (issue 17): a tiny fp32 llama (4 layers) gives the same greedy ids
with PP=2 as with PP=1, through chunked prefill and preemption (tests/unit/test_pipeline_parallel
on CUDA), with each stage's CUDA graphs (decode and lone-prefill) and eagerly. The llama-8b
figures come from tp_gpu.py with PP=2 (benchmarks/pp_gpu.sh).
  python3 benchmarks/pp_gpu.py          (~75 s on an H200 x2: three engines, one process each)
  DRY=1 python3 benchmarks/pp_gpu.py    (CPU, gloo: the script's own check; no graphs there)

Why llama-8b PP=2 thr512 was below one GPU (7,231 vs 8,982 out tok/s, H200 x2, 2026-11-30),
read from the code; `tp_gpu.py peers` under PP prints rank 0's host ms per step by phase:
- eager stages: every step launched ~10 kernels per layer from Python on both ranks (b1 62 tok/s,
  16 ms a token, against 4.8 ms with TP=1's graphs); the tail of thr512, few sequences, ran at
  that rate. Now each stage replays its own graphs.
- the last stage answered each step (sample, wait for the device, pickle, send) before it even
  received the next one, so its GPU idled while its host unpickled, built inputs and launched;
  now it launches the next micro-batch first.
- every send was kept referenced forever (gloo works never report completion), ~16 KB of GPU
  memory per prefill token; now bounded.
- left: exactly PP micro-batches are in flight, so rank 0's round trip (receive the last
  stage's output over gloo TCP, update, schedule, pickle, send, build stage 0's inputs) sits
  between one micro-batch's last stage and its next first stage: both GPUs idle for it once per
  micro-batch (thr512_host_phases: wait_last_stage against the rest). More micro-batches in
  flight than stages (SGLang's --pp-async-batch-depth), the shared-memory step queue instead of
  gloo for the messages, and the sampled ids to stage 0 on the device would each shorten it."""
import json
import os
import subprocess
import sys
import tempfile

import torch
from tp_gpu import emit
from transformers import AutoModelForCausalLM, LlamaConfig

os.environ.setdefault("PAGEDSERVE_COMPILE_AHEAD_STRICT", "1")   # a failed compile-ahead fails the run
from pagedserve import LLM, SamplingParams

DRY = os.environ.get("DRY") == "1"


def write_model(path: str) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)


def run_engine(path: str, name: str, out_json: str) -> None:
    """One engine in this process (an NCCL engine leaves its process group to process exit:
    one per process, tp_executor.shutdown); its greedy ids into `out_json`."""
    g = torch.Generator().manual_seed(2)
    prompts = [{"prompt_token_ids": torch.randint(0, 512, (n,), generator=g).tolist()}
               for n in torch.randint(3, 41, (6,), generator=g).tolist()]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    # 32 tokens a step: prompts are chunked (the prefill graphs take a lone last chunk of <= 32
    # tokens); 9 blocks of 16 for 6 sequences of up to 52 tokens: preemption
    pp2 = dict(pipeline_parallel_size=2, max_num_batched_tokens=32, num_kv_blocks=9)
    kwargs = {"pp1": {}, "pp2_graphs": pp2, "pp2_eager": dict(pp2, enforce_eager=True)}[name]
    llm = LLM(model=path, device="cpu" if DRY else "cuda", dtype="float32", skip_tokenizer_init=True,
              max_model_len=128, **kwargs)
    ids = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    graphs = llm.engine.core.executor.runner.graph_runner   # rank 0's (stage 0 under PP)
    json.dump(dict(ids=ids, stage0_decode_graphs=len(graphs.graphs) if graphs else 0,
                   stage0_prefill_graphs=len(graphs.prefill_graphs) if graphs else 0,
                   preemptions=llm.engine.core.scheduler.stats.num_preemptions), open(out_json, "w"))
    llm.shutdown()
    sys.stdout.flush()
    os._exit(0)   # NCCL teardown at exit hung on this machine (tp_executor.shutdown)


def main() -> None:
    if len(sys.argv) == 4:   # a child: one engine
        run_engine(*sys.argv[1:])
        return
    path = tempfile.mkdtemp()
    write_model(path)
    reference = None
    for name in ("pp1", "pp2_graphs", "pp2_eager"):
        out_json = os.path.join(path, f"{name}.json")
        done = subprocess.run([sys.executable, __file__, path, name, out_json], timeout=110)
        if done.returncode != 0 or not os.path.exists(out_json):
            emit(workload="pp_fp32_tiny", engine=name, failed=f"exit code {done.returncode}")
            continue
        result = json.load(open(out_json))
        ids = result.pop("ids")
        reference = ids if name == "pp1" else reference
        emit(workload="pp_fp32_tiny", engine=name, identical_to_pp1=ids == reference, **result)

if __name__ == "__main__":
    main()
