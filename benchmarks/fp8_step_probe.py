"""kv_cache_dtype fp8 against bf16 in the engine's own decode graph (CUDA): llama-8b dummy, the
decode graph of R rows replayed at context C (decode_models.profile_batch: each row's keys in
its own blocks), kernel by kernel, for each cache type in its own process. One RESULT line per
(cache, rows).      PYTHONPATH=$PWD:benchmarks:.devcarry python3 benchmarks/fp8_step_probe.py auto|fp8"""
from __future__ import annotations

import json
import sys

from decode_models import model_dir, profile_batch


def main() -> None:
    from pagedserve import LLM
    for cache in sys.argv[1:]:
        llm = LLM(model=model_dir("llama-8b"), load_format="dummy", skip_tokenizer_init=True, seed=0,
                  dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.85, kv_cache_dtype=cache)
        graphs = llm.engine.core.executor.runner.graph_runner
        for rows in (64, 256, 448):
            table = profile_batch(llm, graphs, "llama-8b", rows, 800)
            kernels = {k: round(v.get("us", 0), 1) for k, v in table.get("kernels", {}).items()} if table else {}
            print("RESULT " + json.dumps(dict(cache=cache, rows=rows, replay_ms=table.get("replay_ms"),
                                              kernels_us=kernels)), flush=True)
        llm.shutdown()


if __name__ == "__main__":
    main()
