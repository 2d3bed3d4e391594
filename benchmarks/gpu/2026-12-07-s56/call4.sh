#!/usr/bin/env bash
# Session 56, call 4: OVERLAP where groups are small (the guard's region) and in mixed steps.
#   1. cascade_kernels.py at 256:64, 256:32, 64:16 (cascade_overlap against cascade and plain)
#   2. PROMPTS=4 cascade_gpu.py 01 --mix (prefixmix, 4 system prompts: mixed steps, eager attention with the side
#      stream's fork and join each layer) with OVERLAP=1, then OVERLAP=0
# Carry .devcarry.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
{ nvidia-smi --query-gpu=name --format=csv,noheader; date -u +%FT%TZ; } 2>&1 | tee "$OUT/call4.txt"
for rm in 256:64 256:32 64:16; do
  ROWS=${rm%:*} MEMBERS=${rm#*:} PYTHONPATH=$PWD timeout 100 python3 benchmarks/cascade_kernels.py 2>&1 \
    | grep -E "us a call|Error" | tee -a "$OUT/call4.txt"
done
for ov in 1 0; do
  LEFT=$(( ${BUDGET:-585} - ($(date +%s) - T0) ))
  echo "== prefixmix PROMPTS=4 OVERLAP=$ov ($(( $(date +%s) - T0 )) s, ${LEFT} s left)" | tee -a "$OUT/call4.txt"
  [ "$LEFT" -gt 90 ] && PROMPTS=4 OVERLAP=$ov PYTHONPATH=$PWD timeout $(( LEFT - 5 )) python3 benchmarks/cascade_gpu.py \
    01 --mix 2>&1 | grep -E "RESULT|^prefixmix|Error|error" | tee -a "$OUT/call4.txt"
done
