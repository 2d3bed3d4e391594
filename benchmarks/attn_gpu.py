"""Long-context prefill attention on the GPU machine (issue 22): correctness, kernel
throughput, and where a 16k-token prefill of llama-8b spends its time.

Usage (repo root): PYTHONPATH=$PWD python3 benchmarks/attn_gpu.py [--stages micro,decode,tail,engine,long64]
                   PYTHONPATH=$PWD python3 benchmarks/attn_gpu.py --cpu-smoke   (tiny shapes, interpreter)
Needs ~150 s on one H200 (micro ~35 s incl. compiles, decode ~10 s, engine ~40 s, long64 ~50 s).
Prints `RESULT {json}` lines and readable tables; with $OUT set, also $OUT/attn_gpu.jsonl and
the profiler tables $OUT/profile_<mode>.txt.

Stages:
  check   correctness on ragged batches (decodes, chunks after cached contexts, fresh prompts;
          Hq=32, Hkv=8, D=128, block 16): TritonBackend (prefill kernel for long chunks, paged
          kernel for decodes) and the paged kernel alone, bf16 and fp32, against the torch
          reference computed in fp32 from the same numbers. Always runs first; exits 1 on failure.
  micro   attention alone, Hq=32 Hkv=8 D=128 bf16, block 16 with a shuffled block table:
          fresh16k (16,384 new tokens) and chunk8k (8,192 new after 8,192 cached, what a 16k
          prompt is at max_num_batched_tokens 8192): the paged kernel, the prefill kernel
          (default tiles + a small sweep), torch SDPA flash / cuDNN / efficient (fresh, causal)
          and torch.nn.attention.varlen.varlen_attn (when torch has it), in TFLOP/s of causal FLOP.
  decode  split-K or not at batch 1 (choose_splits): 32 paged-kernel calls (one per layer)
          captured in a CUDA graph, contexts 128..16k.
  tail    the decode kernel alone at long64's / thr512's decode-tail shapes and batch 1 (issue 22):
          split rules (legacy, chunked at 8/16/32 tiles) and a tile-shape sweep, us a call and KV
          GB/s, after a check of every variant against the fp32 reference (~80 s on an H200).
  engine  llama-8b dummy, max_model_len 32768 (as ../shared/bench/peers_long.py): ttft16k wall
          (3 fresh prompts) with the prefill kernel and with the paged kernel alone (A/B on
          one engine), then torch.profiler over one fresh 16k prompt each, summed per kernel
          class (attention / matmul / store_kv / other) against the wall time (the rest: host).
  long64  peers_long.py's long64 workload (same seed, same requests) on the same engine,
          prefill kernel then paged kernel.
The stages live beside this entry point: check (and Paged, emit, the arguments) in
attn_common.py, micro and cudnn_shapes in attn_micro.py, decode and tail in attn_tail.py, the
engine stages (engine, long64, budget16k) in attn_engine.py.
"""
from __future__ import annotations

import gc
import random
import sys
import time
import traceback

# attn_common first: it parses the arguments and sets TRITON_INTERPRET for --cpu-smoke
from attn_common import OUT, SMOKE, STAGES, T_START, args, emit, stage_check
from attn_engine import MODES, EngineStages
from attn_micro import stage_cudnn_shapes, stage_micro
from attn_tail import stage_decode, stage_tail
import torch
import triton


def main() -> None:
    if not SMOKE:
        import torch.nn.attention as nn_attention
        impls = getattr(nn_attention, "list_flash_attention_impls", lambda: "n/a")()
        emit(stage="env", device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
             flash_attention_impls=impls)
    ok = stage_check() if STAGES - {"tail"} and not args.skip_check else True   # tail checks its own variants
    if not ok:
        print("CORRECTNESS FAILED: timings skipped", flush=True)
        sys.exit(1)
    failed = []

    def guarded(name, fn, *fn_args) -> None:
        """A stage that fails is reported and the next one still runs (device time is scarce)."""
        try:
            fn(*fn_args)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            emit(stage=name, failed=traceback.format_exc(limit=3)[-600:])

    if "cudnn_shapes" in STAGES:
        guarded("cudnn_shapes", stage_cudnn_shapes)
    if "micro" in STAGES:
        guarded("micro", stage_micro)
    if "decode" in STAGES:
        guarded("decode", stage_decode)
    if "tail" in STAGES:
        guarded("tail", stage_tail)
    if not SMOKE:
        torch.cuda.empty_cache()
    if STAGES & {"engine", "long64", "budget16k"}:
        stages = EngineStages(SMOKE, emit, OUT)
        t0 = time.time()
        llm = stages.make_llm()
        emit(stage="engine", startup_s=round(time.time() - t0, 1))
        modes = tuple(MODES[name] for name in args.modes.split(",") if name)
        if "engine" in STAGES:
            guarded("engine", stages.engine, llm, random.Random(7), *(modes and [modes]))
        if "long64" in STAGES:
            guarded("long64", stages.long64, llm, *(modes and [modes]))
        if "budget16k" in STAGES:
            llm.shutdown()
            del llm
            gc.collect()
            if not SMOKE:
                torch.cuda.empty_cache()
            guarded("budget16k", stages.budget16k)
    emit(stage="done", total_s=round(time.time() - T_START, 1), failed_stages=failed)


if __name__ == "__main__":
    main()
