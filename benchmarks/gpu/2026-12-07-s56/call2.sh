#!/usr/bin/env bash
# Session 56, call 2: the cascade's prefix launch beside its decode launch (triton_cascade.OVERLAP: a side stream,
# the member rows merged after the join). Predicted (H100, llama-8b heads, 2,048 shared keys): cascade_kernels
# 256:256 cascade 117 -> ~85 us a layer (the prefix launch's ~47 us hidden behind the decode launch's ~70, the merge
# +~5); 256:128 319 -> ~290; prefix256 end to end 2.05 -> ~1.85 s.
#   1. cascade_kernels.py (variant cascade_overlap) at 256:256, 256:128, 64:64
#   2. tests/kernels/test_cascade.py on CUDA (both orders; the engine tests capture the fork and join in graphs)
#   3. cascade_gpu.py 01 (prefix256) with OVERLAP=1, then OVERLAP=0, as time allows
# Carry .devcarry (peers_long.py for prefix256's engine).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader; git log --oneline -1; \
  date -u +%FT%TZ; } 2>&1 | tee "$OUT/call2.txt"
for rm in ${SHAPES:-256:256 256:128 64:64}; do
  ROWS=${rm%:*} MEMBERS=${rm#*:} PYTHONPATH=$PWD timeout 100 python3 benchmarks/cascade_kernels.py 2>&1 \
    | grep -E "RESULT|Error" | tee -a "$OUT/call2.txt"
done
echo "== test_cascade ($(( $(date +%s) - T0 )) s)" | tee -a "$OUT/call2.txt"
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_cascade.py 2>&1 | tail -4 \
  | tee -a "$OUT/call2.txt"
for ov in 1 0; do
  LEFT=$(( ${BUDGET:-585} - ($(date +%s) - T0) ))
  echo "== prefix256 OVERLAP=$ov ($(( $(date +%s) - T0 )) s, ${LEFT} s left)" | tee -a "$OUT/call2.txt"
  [ "$LEFT" -gt 90 ] && OVERLAP=$ov PYTHONPATH=$PWD timeout $(( LEFT - 5 )) python3 benchmarks/cascade_gpu.py 01 \
    2>&1 | grep -E "RESULT|^prefix256|Error|error" | tee -a "$OUT/call2.txt"
done
