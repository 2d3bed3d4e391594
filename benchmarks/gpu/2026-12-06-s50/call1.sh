#!/usr/bin/env bash
# Session 50, call 1: decode windows whose rows leave at their last token (window_row_steps) and the window cap.
#   1. benchmarks/window_gpu.py 4: the same tokens with windows of 4 as one step a schedule (CUDA graphs)
#   2. peers_long.py llama-8b through peers_with.py, num_scheduler_steps 1 then 4 (prefix256: the cap's A/B)
#   3. while BUDGET (s) lasts: peers.py llama-1b, num_scheduler_steps 1 and 4 alternating
# Carry .devcarry (peers*.py from ../shared/bench, cfe/ from stage_devcarry.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG="$OUT/call1.txt"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$LOG"
PYTHONPATH=$PWD timeout 150 python3 benchmarks/window_gpu.py 4 2>&1 | grep -E "RESULT|num_scheduler|Error" | tee -a "$LOG"
python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/*.whl
for k in 1 4; do
  echo "== peers_long num_scheduler_steps=$k ($(( $(date +%s) - T0 )) s)" | tee -a "$LOG"
  PYTHONPATH=$PWD:/tmp/cfe_site timeout ${RUN_S:-200} python3 benchmarks/peers_with.py num_scheduler_steps=$k -- \
    .devcarry/peers_long.py pagedserve llama-8b 2>&1 | grep -E "RESULT|Error" | tee -a "$LOG"
done
for i in 1 2 3; do for k in 1 4; do
  [ $(( $(date +%s) - T0 )) -gt ${BUDGET:-470} ] && break 2
  echo "== peers llama-1b num_scheduler_steps=$k run $i ($(( $(date +%s) - T0 )) s)" | tee -a "$LOG"
  PYTHONPATH=$PWD timeout 100 python3 benchmarks/peers_with.py num_scheduler_steps=$k -- .devcarry/peers.py \
    pagedserve llama-1b 2>&1 | grep -E "RESULT|Error" | tee -a "$LOG"
done; done
