#!/usr/bin/env bash
# Session 57, call 1: the standing figures with a long prefill leaving shorter work half the budget (core/scheduler.py),
# ideally on an H200, then long64 A/B: A = the scheduler before that change (.devcarry/scheduler_head.py), B = after.
# Carry .devcarry (peers*.py from ../shared/bench, cfe/ the cuDNN frontend wheel, scheduler_head.py).
# The A/B alone: STANDING=0 SIDES="A B A B A B" bash call1.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
LOG="$OUT/call1.txt"
{ nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader; git log --oneline -1; \
  date -u +%FT%TZ; } 2>&1 | tee "$LOG"
python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/*.whl
run() { PYTHONPATH=$PWD:/tmp/cfe_site timeout "$1" python3 "${@:2}" 2>&1 | grep -E "RESULT|Error" | tee -a "$LOG"; }
if [ "${STANDING:-1}" = 1 ]; then
  run 170 .devcarry/peers.py pagedserve llama-8b
  echo "== peers_long B ($(( $(date +%s) - T0 )) s)" | tee -a "$LOG"
  run 200 .devcarry/peers_long.py pagedserve llama-8b
  echo "== peers llama-1b ($(( $(date +%s) - T0 )) s)" | tee -a "$LOG"
  run 120 .devcarry/peers.py pagedserve llama-1b
fi
cp pagedserve/core/scheduler.py /tmp/scheduler_new.py
for side in ${SIDES:-A B A}; do
  LEFT=$(( ${BUDGET:-570} - ($(date +%s) - T0) ))
  [ "$LEFT" -lt 80 ] && break
  if [ "$side" = A ]; then cp .devcarry/scheduler_head.py pagedserve/core/scheduler.py; else cp /tmp/scheduler_new.py pagedserve/core/scheduler.py; fi
  echo "== peers_long $side ($(( $(date +%s) - T0 )) s, $LEFT s left)" | tee -a "$LOG"
  run $(( LEFT - 5 )) .devcarry/peers_long.py pagedserve llama-8b
done
cp /tmp/scheduler_new.py pagedserve/core/scheduler.py
