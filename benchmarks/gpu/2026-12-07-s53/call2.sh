#!/usr/bin/env bash
# Session 53, call 2: the cascade's launches alone at prefix256's shape (benchmarks/cascade_kernels.py: the prefix
# launch's tile configs, the decode launch's plan), then tests/kernels/test_cascade.py on CUDA (its batches no longer
# let a row write a shared block: call 1's bf16 failure was that race, in the test)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OUT
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/call2.txt"
PYTHONPATH=$PWD timeout 240 python3 benchmarks/cascade_kernels.py 2>&1 | grep -E "RESULT|Error|error" | tee -a "$OUT/call2.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_cascade.py 2>&1 | tail -4 | tee -a "$OUT/call2.txt"
# then the engine A/B (prefix256, cascade off / on) with the fastest prefix tile config, if one beat the default
T=$OUT/cascade_tiles.json; [ -f "$T" ] || T=
CASCADE_TILES=$T PYTHONPATH=$PWD timeout 150 python3 benchmarks/cascade_gpu.py ${ORDER:-01} 2>&1 \
  | grep -E "RESULT|^prefix256|Error|error" | tee -a "$OUT/call2.txt"
