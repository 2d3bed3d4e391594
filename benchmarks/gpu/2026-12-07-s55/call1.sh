#!/usr/bin/env bash
# Session 55, call 1: the standing figures at HEAD (cascade in mixed steps, threshold 8), ideally on an H200.
#   1. peers.py llama-8b (thr512, b1_decode, ttft1024, start-up)
#   2. peers_long.py llama-8b (long64, b1 16k, ttft16k, prefix256, start-up)
#   3. peers.py llama-1b if time is left
# Carry .devcarry (peers*.py from ../shared/bench, cfe/ the cuDNN frontend wheel).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader; git log --oneline -1; \
  date -u +%FT%TZ; } 2>&1 | tee "$OUT/call1.txt"
python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/*.whl
PYTHONPATH=$PWD:/tmp/cfe_site timeout 170 python3 .devcarry/peers.py pagedserve llama-8b 2>&1 \
  | grep -E "RESULT|Error" | tee -a "$OUT/call1.txt"
echo "== peers_long ($(( $(date +%s) - T0 )) s)" | tee -a "$OUT/call1.txt"
PYTHONPATH=$PWD:/tmp/cfe_site timeout 200 python3 .devcarry/peers_long.py pagedserve llama-8b 2>&1 \
  | grep -E "RESULT|Error" | tee -a "$OUT/call1.txt"
LEFT=$(( ${BUDGET:-570} - ($(date +%s) - T0) ))
echo "== peers llama-1b ($(( $(date +%s) - T0 )) s, ${LEFT} s left)" | tee -a "$OUT/call1.txt"
[ "$LEFT" -gt 90 ] && PYTHONPATH=$PWD:/tmp/cfe_site timeout $(( LEFT - 5 )) python3 .devcarry/peers.py pagedserve llama-1b \
  2>&1 | grep -E "RESULT|Error" | tee -a "$OUT/call1.txt"
