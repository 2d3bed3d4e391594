#!/usr/bin/env bash
# Session 49, call 3: decode windows on the long-context workloads (peers_long.py llama-8b: long64, ttft16k, b1 at a
# 16k prefix, prefix256), num_scheduler_steps 1 then 4, one process each (the cuDNN frontend wheel installed, as in
# s48's call1.sh long). Carry .devcarry (peers*.py from ../shared/bench, cfe/ from stage_devcarry.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/call3.txt"
python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/*.whl
for k in 1 4; do
  echo "== num_scheduler_steps=$k" | tee -a "$OUT/call3.txt"
  PYTHONPATH=$PWD:/tmp/cfe_site timeout ${RUN_S:-200} python3 benchmarks/peers_with.py num_scheduler_steps=$k -- \
    .devcarry/peers_long.py pagedserve llama-8b 2>&1 | grep -E "RESULT|Error" | tee -a "$OUT/call3.txt"
done
