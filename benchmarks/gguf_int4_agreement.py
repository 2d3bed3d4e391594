"""Issue 19: what the packed CPU paths change against the exact fp32 path (dtype="float32": the
GGUF blocks dequantized to fp32, bit-identical to transformers), on the default model.

Variants (dtype="auto" unless said):
  cpp    the C++ kernels on the raw blocks (gguf_cpu.cpp; Q4_0 / Q4_1 / Q8_0: Q8 activations,
         integer dots) up to gguf._max_rows rows (CPP_MAX_ROWS; Q8: Q8_MAX_ROWS), a GEMM on
         the weight dequantized per call above (gguf.gemm_dtype: bf16, or fp32 without native bf16)
  int4   PAGEDSERVE_GGUF_CPP=0 (main's path, and the fallback without a compiler): torch's
         int4 kernel up to 64 rows (bf16 activations), a bf16 GEMM above
  fp32   dtype="float32", the reference

Each variant, two workloads, each in two shapes (a product's row count picks the kernel):
  agreement   the 40 prompts of benchmarks/bf16_agreement.py, 32 greedy tokens each (EOS
              masked): "batch" = one generate() of 40 (decode steps of 40 rows), "alone" =
              one prompt at a time (1-row decode: the chat path); prompts whose tokens all
              equal the fp32 reference of the same shape, tokens equal in %
  perplexity  the repository's README.md and ARCHITECTURE.md (English prose, no download),
              16 windows of 512 tokens, from prompt logprobs: "512" = each window one
              prefill step (512-row products), "16" = max_num_batched_tokens=16 (16-row
              products, the decode-sized kernels); relative change against fp32

Usage: PYTHONPATH=. python benchmarks/gguf_int4_agreement.py [--variants cpp,int4] [--out FILE.json]
       [--quick]   (4 prompts, 2 windows: a smoke run)
       [--ref FILE.json]   (the fp32 reference's ids and perplexities: read if it exists, else
                           computed and written; it is the slow part, ~13 min at load ~9)"""
import argparse
import gc
import json
import math
import os
import sys
import time

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bf16_agreement import NEW, PROMPTS, agreement  # noqa: E402

from pagedserve import LLM, SamplingParams  # noqa: E402

WINDOW, MAX_WINDOWS = 512, 16   # 8k tokens


def texts_ids(tokenizer, windows: int) -> list[list[int]]:
    text = "".join(open(name).read() for name in ("README.md", "ARCHITECTURE.md"))
    ids = tokenizer(text).input_ids
    return [ids[i:i + WINDOW] for i in range(0, len(ids) - WINDOW + 1, WINDOW)][:windows]


def perplexity(llm: LLM, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    scored = llm.generate([{"prompt_token_ids": w} for w in windows],
                          SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
    for out in scored:
        for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
            nll -= entry[token].logprob
            count += 1
    return math.exp(nll / count)


def run(variant: str, prompts: list[str], windows: int | list[list[int]]) -> dict:
    os.environ["PAGEDSERVE_GGUF_CPP"] = "0" if variant == "int4" else "1"   # read when the layers load
    dtype = "float32" if variant == "fp32" else "auto"
    greedy = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0.0)   # EOS masked, as bf16_agreement
    out: dict = {}
    llm = LLM(max_model_len=1024, seed=0, dtype=dtype)
    t0 = time.perf_counter()
    out["batch"] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    t1 = time.perf_counter()
    out["alone"] = [llm.generate([p], greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    t2 = time.perf_counter()
    ids = texts_ids(llm.get_tokenizer(), windows) if isinstance(windows, int) else windows
    out["windows"] = ids   # the reference's are reused: the text is files that change
    out["ppl_512"] = perplexity(llm, ids)
    t3 = time.perf_counter()
    del llm
    gc.collect()
    llm = LLM(max_model_len=1024, seed=0, dtype=dtype, max_num_batched_tokens=16)
    t4 = time.perf_counter()
    out["ppl_16"] = perplexity(llm, ids)
    out["seconds"] = dict(batch=round(t1 - t0, 1), alone=round(t2 - t1, 1), ppl_512=round(t3 - t2, 1),
                          ppl_16=round(time.perf_counter() - t4, 1))
    del llm
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="cpp,int4")
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ref")
    args = ap.parse_args()
    prompts, windows = (PROMPTS[:4], 2) if args.quick else (PROMPTS, MAX_WINDOWS)
    load = [round(os.getloadavg()[0], 2)]
    if args.ref and os.path.exists(args.ref):
        with open(args.ref) as f:
            ref = json.load(f)
        assert len(ref["batch"]) == len(prompts), "the reference was computed for other prompts"
    else:
        ref = run("fp32", prompts, windows)
        if args.ref:   # with its windows
            with open(args.ref, "w") as f:
                json.dump(ref, f)
    result = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command="python " + " ".join(sys.argv),
                  prompts=len(prompts), windows=windows, reference="dtype=float32 (blocks dequantized to fp32)",
                  perplexity_fp32={k: round(ref[k], 4) for k in ("ppl_512", "ppl_16")}, seconds_fp32=ref["seconds"],
                  variants={})
    for variant in args.variants.split(","):
        ours = run(variant, prompts, ref["windows"])
        row = {}
        for shape in ("batch", "alone"):
            agree = agreement(ours[shape], ref[shape])
            row[f"agreement_{shape}"] = dict(identical=f"{agree['identical']}/{len(prompts)}",
                                             tokens_equal_pct=agree["tokens_equal_pct"])
        for k in ("ppl_512", "ppl_16"):
            row[k] = dict(perplexity=round(ours[k], 4), change_pct=round(100 * (ours[k] / ref[k] - 1), 3))
        row["seconds"] = ours["seconds"]
        result["variants"][variant] = row
        print(json.dumps({"variant": variant} | row), flush=True)
    load.append(round(os.getloadavg()[0], 2))
    result["load_average_1m"] = load
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
