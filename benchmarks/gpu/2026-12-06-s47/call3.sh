#!/usr/bin/env bash
# Session 47, call 3: the top-k threshold by counting (triton_sampling.kth_rows) against torch.topk. Old tree
# (39e0d97) in .devcarry/main. The nucleus tests on CUDA; kth_rows against kth_values and its launch swept
# (sampler_sweep.py); the sampler
# alone, old / new; thr512 with top_k + top_p (penalty_mix kind sampled_k): llama-1b old / new / old / new, llama-8b
# old / new.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/call3.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_nucleus.py 2>&1 \
  | grep -E "passed|failed|^FAILED" | tee -a "$OUT/call3.txt"
KTH=2048x8x16,4096x8x16,4096x16x16,8192x16x16,4096x16x32 TILES=8192x16 timeout 150 python3 benchmarks/sampler_sweep.py 128 512 2>&1 | grep -E "RESULT|Error" | grep -v same_ids \
  | tee -a "$OUT/call3.txt"
for tree in .devcarry/main .; do
  TREE=$tree SETTINGS=top_p,top_k_top_p PARTS=0 timeout 120 python3 benchmarks/sampler_gpu.py 128 512 \
    2>&1 | grep -E "RESULT|Error" | grep -v '"kernel": false' | tee -a "$OUT/call3.txt"
done
for run in "llama-1b .devcarry/main" "llama-1b ." "llama-1b .devcarry/main" "llama-1b ." "llama-8b .devcarry/main" \
           "llama-8b ."; do
  set -- $run
  TREE=$2 timeout 120 python3 benchmarks/penalty_mix.py --model "$1" --rounds 1 --kinds base,sampled_k \
    2>&1 | grep -E "RESULT|Error|error" | tee -a "$OUT/call3.txt"
done
