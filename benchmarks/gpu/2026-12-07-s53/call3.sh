#!/usr/bin/env bash
# Session 53, call 3: the cascade's tuned launches (prefix launch 3 stages; decode launch 32-key tiles, 2 stages,
# <= 4 segments) against session 52's and the plain launch (benchmarks/cascade_kernels.py), test_cascade.py on CUDA
# (the race fix and the launch plans), then the engine A/B on prefix256 (cascade_gpu.py 01). Carry .devcarry.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OUT
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/call3.txt"
PYTHONPATH=$PWD timeout 150 python3 benchmarks/cascade_kernels.py 2>&1 | grep -E "RESULT|Error|error" | tee -a "$OUT/call3.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_cascade.py 2>&1 | tail -4 | tee -a "$OUT/call3.txt"
PYTHONPATH=$PWD timeout 150 python3 benchmarks/cascade_gpu.py ${ORDER:-01} 2>&1 \
  | grep -E "RESULT|^prefix256|Error|error|captured" | tee -a "$OUT/call3.txt"
