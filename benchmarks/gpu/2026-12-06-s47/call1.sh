#!/usr/bin/env bash
# Session 47, call 1: the top-k threshold from group candidates (nucleus.kth_values). Old tree (HEAD before it) in
# .devcarry/main. The nucleus tests on CUDA; kth_values against a whole-row topk (sampler_sweep.py); the sampler
# alone, old / new; thr512 with top_k + top_p (penalty_mix kind sampled_k): llama-1b old / new / old / new, llama-8b
# old / new.
# Call 3 (the top-k threshold by counting, triton_sampling.kth_rows, against the old tree's torch.topk):
#   CALL=call3 KTH=2048x8x16,4096x16x16,8192x16x16 RUNS="llama-1b:.devcarry/main llama-1b:. llama-1b:.devcarry/main
#   llama-1b:." bash call1.sh
set -uo pipefail
CALL=${CALL:-call1}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/$CALL.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/unit/test_nucleus.py 2>&1 \
  | grep -E "passed|failed|^FAILED" | tee -a "$OUT/$CALL.txt"
TILES=8192x16 timeout 150 python3 benchmarks/sampler_sweep.py 128 512 2>&1 | grep -E "RESULT|Error" | grep -v same_ids \
  | tee -a "$OUT/$CALL.txt"
for tree in .devcarry/main .; do
  TREE=$tree SETTINGS=top_p,top_k_top_p PARTS=0 timeout 120 python3 benchmarks/sampler_gpu.py 128 512 \
    2>&1 | grep -E "RESULT|Error" | grep -v '"kernel": false' | tee -a "$OUT/$CALL.txt"
done
[ "$CALL" = call1 ] && TREE=. SETTINGS=top_p PARTS=0 CPROFILE=1 timeout 60 python3 benchmarks/sampler_gpu.py 512 > "$OUT/${CALL}_cprofile.txt" 2>&1
for run in ${RUNS:-llama-1b:.devcarry/main llama-1b:. llama-1b:.devcarry/main llama-1b:. llama-8b:.devcarry/main llama-8b:.}; do
  set -- ${run/:/ }
  TREE=$2 timeout 120 python3 benchmarks/penalty_mix.py --model "$1" --rounds 1 --kinds base,sampled_k \
    2>&1 | grep -E "RESULT|Error|error" | tee -a "$OUT/$CALL.txt"
done
