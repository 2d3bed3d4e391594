"""Pipeline parallelism on GPU (issue 17): a tiny fp32 llama (4 layers) gives the same greedy ids
with PP=2 as with PP=1, through chunked prefill and preemption (tests/unit/test_pipeline_parallel
on CUDA). The llama-8b figures come from tp_gpu.py with PP=2 (benchmarks/pp_gpu.sh).
  python3 benchmarks/pp_gpu.py"""
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path[:0] = [".devcarry", "../shared/bench"]
from peers import emit  # noqa: E402

from pagedserve import LLM, SamplingParams  # noqa: E402


def main() -> None:
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


if __name__ == "__main__":
    main()
