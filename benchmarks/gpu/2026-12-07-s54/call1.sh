#!/usr/bin/env bash
# Session 54, call 1: the standing long-context figures at HEAD (cascade tuned in session 53), ideally on an H200.
#   1. benchmarks/cascade_gpu.py ORDER (default 0110): prefix256 llama-8b cascade off / on, one engine, same tokens
#   2. peers_long.py llama-8b at HEAD's defaults (long64, b1 16k, ttft16k, prefix256, start-up), one process
#   3. test_cascade.py on CUDA if time is left
# Carry .devcarry (peers*.py from ../shared/bench, cfe/ the cuDNN frontend wheel).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader; git log --oneline -1; \
  date -u +%FT%TZ; } 2>&1 | tee "$OUT/call1.txt"
PYTHONPATH=$PWD timeout 200 python3 benchmarks/cascade_gpu.py ${ORDER:-0110} 2>&1 \
  | grep -E "RESULT|^prefix256|Error|error" | tee -a "$OUT/call1.txt"
python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/*.whl
echo "== peers_long ($(( $(date +%s) - T0 )) s)" | tee -a "$OUT/call1.txt"
PYTHONPATH=$PWD:/tmp/cfe_site timeout 200 python3 .devcarry/peers_long.py pagedserve llama-8b 2>&1 \
  | grep -E "RESULT|Error" | tee -a "$OUT/call1.txt"
LEFT=$(( ${BUDGET:-570} - ($(date +%s) - T0) ))
echo "== test_cascade ($(( $(date +%s) - T0 )) s, ${LEFT} s left)" | tee -a "$OUT/call1.txt"
[ "$LEFT" -gt 100 ] && timeout $(( LEFT - 10 )) python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_cascade.py \
  2>&1 | tail -3 | tee -a "$OUT/call1.txt"
