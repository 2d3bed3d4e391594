#!/usr/bin/env bash
# Session 54, call 2 (same warm machine): peers.py llama-8b and llama-1b at HEAD (thr512, b1_decode, ttft1024,
# start-up), one process each. Carry .devcarry.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/call2.txt"
for m in ${MODELS:-llama-8b llama-1b}; do
  LEFT=$(( ${BUDGET:-570} - ($(date +%s) - T0) ))
  echo "== peers $m ($(( $(date +%s) - T0 )) s, ${LEFT} s left)" | tee -a "$OUT/call2.txt"
  [ "$LEFT" -gt 90 ] && PYTHONPATH=$PWD timeout $LEFT python3 .devcarry/peers.py pagedserve $m 2>&1 \
    | grep -E "RESULT|Error" | tee -a "$OUT/call2.txt"
done
