"""Decode steps of 2-64 rows, engine A/B (issue 22): each variant a fresh engine (llama-1b / 8b dummy
weights, bf16, max_model_len 2048, as peers.py), variants interleaved in one process:

- rows16: main before this change (the gemv up to 16 rows with one launch shape, cuBLAS above; the
  decode fusions, rotary + KV store in the attention launch, up to 16 rows);
- attn64: PAGEDSERVE_GEMV_MAX_ROWS=64 with no row-bucket table: the decode fusions up to 64 rows,
  cuBLAS for every matmul above 16 rows;
- gemv64: the same with triton_gemv.MCONFIGS from benchmarks/gemv_sweep.py's table (--table; or
  the library's own table without --table).

Per engine: each decode graph of 1-64 rows replayed at context 800 (every row its own blocks,
nothing stored), median of 3 x 20 replays (ms); with --thr512 peers.py's thr512 (512 requests,
input 64-1024, output 16-512: decode_models.run_thr512, peers.py's own workload where .devcarry/ is
on PYTHONPATH); the greedy ids of 24 prompts (32 tokens: steps of
24 rows) against the first variant's; the wall time of 48 prompts x 96 tokens. Prints RESULT lines; writes
OUT/gemv_rows.json.

Usage: python3 benchmarks/gemv_rows_gpu.py OUT [--table sweep.json] [--models llama-8b,llama-1b]
       [--variants rows16,gemv64,attn64,rows16,gemv64]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_common import replay_ms as timed_replay_ms, set_decode_inputs  # noqa: E402
from decode_models import model_dir, run_thr512  # noqa: E402

ROWS = [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 128]
CONTEXT = 800


def replay_ms(graph, replays: int = 20) -> float:
    return statistics.median(timed_replay_ms(graph, replays) for _ in range(3))


@torch.inference_mode()
def graph_replays(llm) -> dict:
    graphs = llm.engine.core.executor.runner.graph_runner
    k_cache = llm.engine.core.executor.runner.kv_caches[0][0]
    block_size = k_cache.shape[1]
    per_row = -(-(CONTEXT + 1) // block_size)
    out = {}
    for rows in ROWS:
        if rows not in graphs.graphs:
            continue
        set_decode_inputs(graphs, rows, CONTEXT, per_row)
        torch.cuda.synchronize()
        out[rows] = round(replay_ms(graphs.graphs[rows]), 4)
        set_decode_inputs(graphs, rows, None)   # as the runner leaves padding rows
    return out


def run(name: str, variant: str, table: dict, with_thr: bool) -> dict:
    from pagedserve import LLM, SamplingParams
    from pagedserve.layers import triton_gemv
    os.environ["PAGEDSERVE_GEMV_MAX_ROWS"] = "16" if variant.startswith("rows16") else "64"
    saved = dict(triton_gemv.MCONFIGS)
    triton_gemv.MCONFIGS.clear()
    if variant.startswith("gemv64"):
        triton_gemv.MCONFIGS.update(table or saved)
    try:
        t0 = time.time()
        llm = LLM(model=model_dir(name), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                  max_model_len=2048, gpu_memory_utilization=0.85, seed=0)
        res = dict(model=name, variant=variant, ready_s=round(time.time() - t0, 1))
        res["replay_ms"] = graph_replays(llm)
        rng = random.Random(0)
        prompts = [{"prompt_token_ids": [rng.randrange(3, 32000) for _ in range(rng.randint(64, 300))]}
                   for _ in range(24)]
        sp = SamplingParams(max_tokens=32, ignore_eos=True, temperature=0.0, detokenize=False)
        res["ids"] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]
        prompts = [{"prompt_token_ids": [rng.randrange(3, 32000) for _ in range(rng.randint(64, 512))]}
                   for _ in range(48)]
        sp = SamplingParams(max_tokens=96, ignore_eos=True, temperature=0.0, detokenize=False)
        llm.generate(prompts[:4], sp, use_tqdm=False)
        t0 = time.time()
        llm.generate(prompts, sp, use_tqdm=False)
        res["c48_wall_s"] = round(time.time() - t0, 3)
        if with_thr:
            res["thr512_out_tok_s"] = run_thr512(llm)["out_tok_s"]
        llm.shutdown()
        del llm
    finally:
        triton_gemv.MCONFIGS.clear()
        triton_gemv.MCONFIGS.update(saved)
        os.environ.pop("PAGEDSERVE_GEMV_MAX_ROWS", None)
        gc.collect()
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--table", default="")
    ap.add_argument("--models", default="llama-8b,llama-1b")
    ap.add_argument("--variants", default="rows16,gemv64,attn64,rows16,gemv64")
    ap.add_argument("--thr512", action="store_true")
    args = ap.parse_args()
    from gemv_sweep import load_table
    table = load_table(args.table) if args.table else {}
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in args.models.split(","):
        base_ids = None
        for variant in args.variants.split(","):
            res = run(name, variant, table, args.thr512)
            if base_ids is None:   # the first variant's ids: the others against them
                base_ids = res["ids"]
            if base_ids is not None:
                res["ids_equal_prompts"] = sum(a == b for a, b in zip(base_ids, res["ids"]))
                res["ids_equal_tokens"] = sum(x == y for a, b in zip(base_ids, res["ids"]) for x, y in zip(a, b))
            results.append(res)
            print("RESULT " + json.dumps({k: v for k, v in res.items() if k != "ids"}), flush=True)
    json.dump(dict(date=time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), context=CONTEXT,
                   machine=f"{torch.cuda.get_device_name()}, torch {torch.__version__}",
                   table={"x".join(map(str, k)): (v.__dict__ if v else None) for k, v in table.items()},
                   results=results), open(os.path.join(args.out, "gemv_rows.json"), "w"), indent=1)
    print("\n| model | variant | " + " | ".join(f"{r} rows" for r in ROWS) + " | c48 s | thr512 | ids equal (of 24) |")
    for res in results:
        print(f"| {res['model']} | {res['variant']} | "
              + " | ".join(str(res["replay_ms"].get(r, "-")) for r in ROWS)
              + f" | {res['c48_wall_s']} | {res.get('thr512_out_tok_s', '-')} | {res.get('ids_equal_prompts', '-')} |")


if __name__ == "__main__":
    main()
