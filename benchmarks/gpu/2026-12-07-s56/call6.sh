#!/usr/bin/env bash
# Session 56, call 6: CASCADE_MAX_GROUPS 8 against 4 where a step holds 8 system prompts' groups (prefixmix,
# PROMPTS=8: session 55 measured 1.10x with 4 of the 8 groups a step taking the cascade). Predicted: 8 groups
# ~1.30x (the 4-prompt case's 1.34-1.41x, less the spare tiles and the smaller groups).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
{ nvidia-smi --query-gpu=name --format=csv,noheader; date -u +%FT%TZ; } 2>&1 | tee "$OUT/call6.txt"
for groups in 8 4; do
  LEFT=$(( ${BUDGET:-420} - ($(date +%s) - T0) ))
  echo "== prefixmix PROMPTS=8 MAX_GROUPS=$groups ($(( $(date +%s) - T0 )) s, ${LEFT} s left)" | tee -a "$OUT/call6.txt"
  [ "$LEFT" -gt 90 ] && PROMPTS=8 MAX_GROUPS=$groups PYTHONPATH=$PWD timeout $(( LEFT - 5 )) python3 \
    benchmarks/cascade_gpu.py 010 --mix 2>&1 | grep -E "RESULT|^prefixmix|Error|error" | tee -a "$OUT/call6.txt"
done
