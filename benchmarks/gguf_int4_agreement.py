"""Issue 19: what the CPU int4 path (GGUF blocks on torch's int4 kernel up to 64 rows, a bf16
GEMM on the int4 weight dequantized for the call above: bf16 activations, scales and output
per matmul either way) changes against the exact fp32 path (dtype="float32": the
same blocks dequantized to fp32, bit-identical to transformers), on the default model.

  agreement   the 40 prompts of benchmarks/bf16_agreement.py, 32 greedy tokens each (EOS
              masked), one batch: prompts whose tokens are all equal, tokens equal in %
  perplexity  the repository's README.md and ARCHITECTURE.md (English prose, no download),
              in 512-token windows, from prompt logprobs: int4 vs fp32, relative change

Usage: PYTHONPATH=. python benchmarks/gguf_int4_agreement.py [out.json]"""
import json
import math
import os
import sys
import time

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bf16_agreement import NEW, PROMPTS, agreement  # noqa: E402

from pagedserve import LLM, SamplingParams  # noqa: E402

WINDOW, MAX_WINDOWS = 512, 16   # 8k tokens: minutes on a loaded 2-core machine


def texts_ids(tokenizer) -> list[list[int]]:
    text = "".join(open(name).read() for name in ("README.md", "ARCHITECTURE.md"))
    ids = tokenizer(text).input_ids
    return [ids[i:i + WINDOW] for i in range(0, len(ids) - WINDOW + 1, WINDOW)][:MAX_WINDOWS]


def run(dtype: str) -> tuple[list[list[int]], float, float]:
    llm = LLM(max_model_len=1024, seed=0, dtype=dtype)
    greedy = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0.0)   # EOS masked, as bf16_agreement
    t0 = time.perf_counter()
    outs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    seconds = time.perf_counter() - t0
    nll, count = 0.0, 0
    windows = texts_ids(llm.get_tokenizer())
    scored = llm.generate([{"prompt_token_ids": w} for w in windows],
                          SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
    for out in scored:
        for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
            nll -= entry[token].logprob
            count += 1
    return outs, math.exp(nll / count), seconds


def main() -> None:
    ref, ppl_ref, s_ref = run("float32")
    ours, ppl, s_ours = run("auto")
    result = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command="python " + " ".join(sys.argv),
                  reference="dtype=float32 (blocks dequantized to fp32)", candidate="dtype=auto (int4 kernel up to 64 rows, bf16 GEMM on the int4 weight dequantized above)",
                  agreement=agreement(ours, ref), perplexity_fp32=round(ppl_ref, 4), perplexity_int4=round(ppl, 4),
                  perplexity_change_pct=round(100 * (ppl / ppl_ref - 1), 3),
                  generate_40_prompts_s=dict(fp32=round(s_ref, 2), int4=round(s_ours, 2)))
    print(json.dumps({k: v for k, v in result.items() if k != "agreement"} | {
        "identical": result["agreement"]["identical"], "tokens_equal_pct": result["agreement"]["tokens_equal_pct"]}))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
