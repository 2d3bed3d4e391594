#!/usr/bin/env bash
# Session 56, call 5: where OVERLAP's prefixmix loss (call 4: 10.776 -> 11.842 s) comes from: OVERLAP=graphs (the
# decode graphs overlapped, the mixed steps' eager attention not) against OVERLAP=0, prefixmix with 4 prompts.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
{ nvidia-smi --query-gpu=name --format=csv,noheader; date -u +%FT%TZ; } 2>&1 | tee "$OUT/call5.txt"
for ov in graphs 0; do
  LEFT=$(( ${BUDGET:-400} - ($(date +%s) - T0) ))
  echo "== prefixmix PROMPTS=4 OVERLAP=$ov ($(( $(date +%s) - T0 )) s, ${LEFT} s left)" | tee -a "$OUT/call5.txt"
  [ "$LEFT" -gt 90 ] && PROMPTS=4 OVERLAP=$ov PYTHONPATH=$PWD timeout $(( LEFT - 5 )) python3 benchmarks/cascade_gpu.py \
    010 --mix 2>&1 | grep -E "RESULT|^prefixmix|Error|error" | tee -a "$OUT/call5.txt"
done
