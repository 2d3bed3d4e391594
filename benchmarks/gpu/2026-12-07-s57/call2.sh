#!/usr/bin/env bash
# Session 57, call 2: long64 A/B on whatever GPU comes: A = the scheduler before aa18d9e (.devcarry/scheduler_head.py),
# B = a long prefill leaving shorter work half the budget (aa18d9e). peers_long.py llama-8b, order A B A B.
# Carry .devcarry (peers*.py from ../shared/bench, cfe/ the cuDNN frontend wheel, scheduler_head.py).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
LOG="$OUT/call2.txt"
{ nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader; git log --oneline -1; \
  date -u +%FT%TZ; } 2>&1 | tee "$LOG"
python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/*.whl
cp pagedserve/core/scheduler.py /tmp/scheduler_new.py
for side in A B A B A B; do
  LEFT=$(( ${BUDGET:-570} - ($(date +%s) - T0) ))
  [ "$LEFT" -lt 75 ] && break
  if [ "$side" = A ]; then cp .devcarry/scheduler_head.py pagedserve/core/scheduler.py; else cp /tmp/scheduler_new.py pagedserve/core/scheduler.py; fi
  echo "== peers_long $side ($(( $(date +%s) - T0 )) s, $LEFT s left)" | tee -a "$LOG"
  PYTHONPATH=$PWD:/tmp/cfe_site timeout $(( LEFT - 5 )) python3 .devcarry/peers_long.py pagedserve llama-8b 2>&1 \
    | grep -E "RESULT|Error" | tee -a "$LOG"
done
cp /tmp/scheduler_new.py pagedserve/core/scheduler.py
