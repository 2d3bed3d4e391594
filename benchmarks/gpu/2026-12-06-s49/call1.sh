#!/usr/bin/env bash
# Session 49, call 1: decode windows (num_scheduler_steps) on the GPU.
#   1. benchmarks/window_gpu.py: the same tokens with windows of 4 as one step a schedule (CUDA graphs)
#   2. peers.py through peers_with.py, num_scheduler_steps 1 and 4 alternating, one process each:
#      llama-1b PAIRS_1B times (default 3), then llama-8b PAIRS_8B times (default 1)
# Carry .devcarry (peers*.py from ../shared/bench).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/call1.txt"
PYTHONPATH=$PWD timeout 150 python3 benchmarks/window_gpu.py 4 2>&1 | grep -E "RESULT|num_scheduler|Error" \
  | tee -a "$OUT/call1.txt"
for spec in "llama-1b ${PAIRS_1B:-3}" "llama-8b ${PAIRS_8B:-1}"; do
  set -- $spec
  for i in $(seq $2); do
    for k in 1 4; do
      [ $(( $(date +%s) - T0 )) -gt ${BUDGET:-520} ] && break 3
      echo "== $1 num_scheduler_steps=$k run $i ($(( $(date +%s) - T0 )) s)" | tee -a "$OUT/call1.txt"
      PYTHONPATH=$PWD timeout 120 python3 benchmarks/peers_with.py num_scheduler_steps=$k -- .devcarry/peers.py \
        pagedserve $1 2>&1 | grep -E "RESULT|Error" | tee -a "$OUT/call1.txt"
    done
  done
done
