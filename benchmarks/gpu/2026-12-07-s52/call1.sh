#!/usr/bin/env bash
# Session 52, call 1: prefix256's window loss and the long-context figures on an H200.
#   1. benchmarks/prefix256_window.py 4 14411441 --profile: K=1 and K=4 in one engine, each mode first and last,
#      then one profiled run of each (device busy, gaps, host calls)                  -> $OUT/call1.txt, prefix256_k*_top.txt
#   2. peers_long.py llama-8b at num_scheduler_steps ORDER (default "4 1": K=4 first this time), one process each
#      (the cuDNN frontend wheel installed, as in session 48's call1.sh long)        -> $OUT/call1.txt
# Carry .devcarry (peers*.py from ../shared/bench, cfe/ from stage_devcarry.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OUT
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/call1.txt"
PYTHONPATH=$PWD timeout ${P256_S:-240} python3 benchmarks/prefix256_window.py 4 ${P256_ORDER:-14411441} --profile 2>&1 \
  | grep -E "RESULT|^run|Error" | tee -a "$OUT/call1.txt"
python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/*.whl
for k in ${ORDER:-4 1}; do
  echo "== peers_long num_scheduler_steps=$k" | tee -a "$OUT/call1.txt"
  PYTHONPATH=$PWD:/tmp/cfe_site timeout ${RUN_S:-200} python3 benchmarks/peers_with.py num_scheduler_steps=$k -- \
    .devcarry/peers_long.py pagedserve llama-8b 2>&1 | grep -E "RESULT|Error" | tee -a "$OUT/call1.txt"
done
