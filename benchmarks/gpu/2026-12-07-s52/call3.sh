#!/usr/bin/env bash
# Session 52, call 3 (call 2 shortened for a small device budget): cascade attention on the GPU.
#   1. tests/kernels/test_cascade.py on CUDA (the kernels in bf16 / fp32, the engine end to end) -> $OUT/call3.txt
#   2. benchmarks/cascade_gpu.py ORDER (default 0110): prefix256 llama-8b cascade off / on, one engine, and the
#      same-tokens check
#   3. if BUDGET (default 400 s) leaves > 200 s: peers_long.py llama-8b at HEAD's defaults
# Carry .devcarry (peers*.py from ../shared/bench, cfe/ from stage_devcarry.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/call3.txt"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_cascade.py 2>&1 | tail -4 | tee -a "$OUT/call3.txt"
PYTHONPATH=$PWD timeout 180 python3 benchmarks/cascade_gpu.py ${ORDER:-0110} 2>&1 \
  | grep -E "RESULT|^prefix256|Error|error" | tee -a "$OUT/call3.txt"
LEFT=$(( ${BUDGET:-400} - ($(date +%s) - T0) ))
echo "== peers_long ($(( $(date +%s) - T0 )) s, ${LEFT} s left)" | tee -a "$OUT/call3.txt"
if [ "$LEFT" -gt 200 ]; then
  python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/*.whl
  PYTHONPATH=$PWD:/tmp/cfe_site timeout $LEFT python3 .devcarry/peers_long.py pagedserve llama-8b 2>&1 \
    | grep -E "RESULT|Error" | tee -a "$OUT/call3.txt"
fi
