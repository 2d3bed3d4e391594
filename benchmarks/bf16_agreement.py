"""Issue 4 part 6: on the GPU, in bf16, on how many prompts of the default model do the first
32 greedy tokens of pagedserve equal transformers' bf16 output? Measured twice: the 40 prompts
in one batch (how a server runs them), and one at a time (batch 1, as transformers runs them).
Batching changes the GEMM shapes and so the bf16 rounding of each row (batch variance); on
CPU the one-at-a-time run is bit-identical to transformers.
Both sides load the same weights: the GGUF's dequantized tensors (pagedserve's converted
folder, bit-identical to the GGUF), cast to bf16. transformers runs one prompt at a time (no
padding), pagedserve the whole batch.
Usage: python3 benchmarks/bf16_agreement.py [out.json] [device]"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, ".")
from pagedserve import LLM, SamplingParams  # noqa: E402
from pagedserve.models.default_model import default_model_path  # noqa: E402
from pagedserve.models.loader import ModelSource, materialize_gguf  # noqa: E402

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time", "The three primary colors are",
    "Water boils at", "My favorite food is", "In 1492, Columbus", "The largest planet in the solar system is",
    "Hello, my name is", "To make a cake, you need", "The best way to learn a language is",
    "Photosynthesis is the process", "import numpy as np\n", "The meaning of life is", "Dear Sir or Madam,",
    "The quick brown fox", "In the beginning", "A good night's sleep", "The stock market today",
    "Machine learning is", "The Eiffel Tower was built", "How do airplanes fly?", "List three fruits:",
    "The recipe for pancakes", "Translate to French: Good morning", "The theory of relativity states",
    "Write a haiku about the sea", "SELECT * FROM users WHERE", "The history of Rome", "Why is the sky blue?",
    "My dog likes to", "The first step in solving any problem", "Tomorrow I will", "The ocean is home to",
    "What is 12 times 12?", "A poem about autumn:", "The human heart has", "Python is a programming language that",
    "The Great Wall of China", "Explain gravity to a child.",
]
NEW = 32


def main() -> None:
    out_path = sys.argv[1] if len(sys.argv) > 1 else "bf16_agreement.json"
    device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
    gguf = default_model_path()
    llm = LLM(model=gguf, device=device, dtype="bfloat16", seed=0)
    tok = llm.get_tokenizer()
    # EOS masked on both sides (min_tokens here, min_new_tokens there), so both run 32 tokens
    sp = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0.0)
    batched = llm.generate(PROMPTS, sp, use_tqdm=False)                       # all 40 in one batch
    single = [llm.generate([p], sp, use_tqdm=False)[0] for p in PROMPTS]      # one at a time
    from transformers import AutoModelForCausalLM
    t0 = time.time()
    folder = materialize_gguf(ModelSource(os.path.dirname(gguf), os.path.basename(gguf))).directory
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    print(f"transformers loaded {folder} in {time.time() - t0:.1f} s", flush=True)
    refs = []
    for prompt, out in zip(PROMPTS, batched):
        ids = torch.tensor([out.prompt_token_ids], device=device)
        assert ids[0].tolist() == tok(prompt).input_ids
        with torch.no_grad():
            refs.append(hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                                    min_new_tokens=NEW, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist())
    result = dict(prompts=len(PROMPTS), new_tokens=NEW, device=torch.cuda.get_device_name() if device == "cuda" else device,
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    for mode, outs in (("batched", batched), ("one_at_a_time", single)):
        rows, equal, tokens_equal = [], 0, 0
        for prompt, out, ref in zip(PROMPTS, outs, refs):
            ours = list(out.outputs[0].token_ids)
            first_diff = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
            equal += ours == ref
            tokens_equal += sum(a == b for a, b in zip(ours, ref))
            rows.append(dict(prompt=prompt, first_diff=first_diff))
        result[mode] = dict(identical=equal, identical_pct=round(100 * equal / len(PROMPTS), 1),
                            tokens_equal_pct=round(100 * tokens_equal / (NEW * len(PROMPTS)), 1), rows=rows)
        print(f"{mode}: {equal}/{len(PROMPTS)} identical; first differences {[r['first_diff'] for r in rows]}")
    print("RESULT " + json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "rows"} if isinstance(v, dict) else v)
                                  for k, v in result.items()}))
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
