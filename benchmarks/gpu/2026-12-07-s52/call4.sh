#!/usr/bin/env bash
# Session 52, call 4 (the last of a small device budget): cascade attention's A/B first, then its GPU tests.
#   1. benchmarks/cascade_gpu.py ORDER (default 0110): prefix256 llama-8b, cascade off / on in one engine (the
#      script sets TritonBackend.cascade each run, whatever the default), and the same-tokens check -> $OUT/call4.txt
#   2. tests/kernels/test_cascade.py on CUDA, in what BUDGET (default 240 s) leaves
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/call4.txt"
PYTHONPATH=$PWD timeout 150 python3 benchmarks/cascade_gpu.py ${ORDER:-0110} 2>&1 \
  | grep -E "RESULT|^prefix256|Error|error|captured" | tee -a "$OUT/call4.txt"
LEFT=$(( ${BUDGET:-240} - ($(date +%s) - T0) ))
echo "== tests ($(( $(date +%s) - T0 )) s, ${LEFT} s left)" | tee -a "$OUT/call4.txt"
[ "$LEFT" -gt 30 ] && timeout $LEFT python3 -m pytest -q -p no:cacheprovider tests/kernels/test_cascade.py 2>&1 \
  | tail -4 | tee -a "$OUT/call4.txt"
