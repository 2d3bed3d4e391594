#!/usr/bin/env bash
# Session 54, call 2: cascade attention for the decode rows of mixed steps (and eager all-decode steps).
#   1. test_cascade.py (with the mixed-batch kernel test and the engine's mixed-step test), test_profile_run_mixed.py,
#      test_paged_attention.py on CUDA                                                              -> $OUT/call2.txt
#   2. benchmarks/cascade_gpu.py ORDER --mix: prefixmix llama-8b (1,024 x (2,048 shared + 64), out 16-240,
#      max_num_seqs 256: mostly mixed steps) cascade off / on in one engine; mixed steps counted; same tokens
#   3. benchmarks/cascade_gpu.py 0110: prefix256 (all-decode steps: the cascade graphs, unchanged) as a check
#   4. peers.py llama-8b if time is left (thr512 has no shared prefix: its mixed steps now look for one; level expected)
# Carry .devcarry.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader; git log --oneline -1; } | tee "$OUT/call2.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_cascade.py tests/unit/test_profile_run_mixed.py \
  tests/kernels/test_paged_attention.py 2>&1 | tail -15 | tee -a "$OUT/call2.txt"
echo "== prefixmix ($(( $(date +%s) - T0 )) s)" | tee -a "$OUT/call2.txt"
PYTHONPATH=$PWD timeout 240 python3 benchmarks/cascade_gpu.py ${ORDER:-0110} --mix 2>&1 \
  | grep -E "RESULT|^prefixmix|Error|error|late" | tee -a "$OUT/call2.txt"
LEFT=$(( ${BUDGET:-585} - ($(date +%s) - T0) ))
echo "== prefix256 ($(( $(date +%s) - T0 )) s, ${LEFT} s left)" | tee -a "$OUT/call2.txt"
[ "$LEFT" -gt 60 ] && PYTHONPATH=$PWD timeout $(( LEFT - 5 )) python3 benchmarks/cascade_gpu.py 01 2>&1 \
  | grep -E "RESULT|^prefix256|Error|error" | tee -a "$OUT/call2.txt"
LEFT=$(( ${BUDGET:-585} - ($(date +%s) - T0) ))
echo "== peers llama-8b ($(( $(date +%s) - T0 )) s, ${LEFT} s left)" | tee -a "$OUT/call2.txt"
[ "$LEFT" -gt 100 ] && PYTHONPATH=$PWD timeout $(( LEFT - 5 )) python3 .devcarry/peers.py pagedserve llama-8b 2>&1 \
  | grep -E "RESULT|Error" | tee -a "$OUT/call2.txt"
