#!/usr/bin/env bash
# Session 53, call 1: session 52's open device items, in order of need.
#   1. tests/kernels/test_cascade.py on CUDA (the narrow plan's exclusion from cascade launches is not yet run on a GPU)
#   2. benchmarks/cascade_gpu.py 01 --profile: prefix256 llama-8b cascade off / on, the same-tokens check, then one
#      profiled run each way (top kernels -> $OUT/prefix256_cascade{0,1}_top.txt): where the 1.50x (not ~2x) went
#   3. if BUDGET (default 560 s) leaves > 200 s: peers_long.py llama-8b at HEAD (long64, ttft16k, prefix256)
# Carry .devcarry (peers*.py from ../shared/bench, cfe/ from stage_devcarry.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OUT
T0=$(date +%s)
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/call1.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_cascade.py 2>&1 | tail -6 | tee -a "$OUT/call1.txt"
echo "== cascade_gpu ($(( $(date +%s) - T0 )) s)" | tee -a "$OUT/call1.txt"
PYTHONPATH=$PWD timeout 200 python3 benchmarks/cascade_gpu.py ${ORDER:-01} --profile 2>&1 \
  | grep -E "RESULT|^prefix256|Error|error|captured" | tee -a "$OUT/call1.txt"
LEFT=$(( ${BUDGET:-560} - ($(date +%s) - T0) ))
echo "== peers_long ($(( $(date +%s) - T0 )) s, ${LEFT} s left)" | tee -a "$OUT/call1.txt"
if [ "$LEFT" -gt 200 ]; then
  python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/*.whl
  PYTHONPATH=$PWD:/tmp/cfe_site timeout $LEFT python3 .devcarry/peers_long.py pagedserve llama-8b 2>&1 \
    | grep -E "RESULT|Error" | tee -a "$OUT/call1.txt"
fi
