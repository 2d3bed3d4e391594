#!/usr/bin/env bash
# Session 54, call 5: CASCADE_MIN_ROWS 8 (was 64).
#   1. test_cascade.py on CUDA (the engine tests take the cascade from 8 rows now)          -> $OUT/call5.txt
#   2. serve_gpu.sh as call 3 at 16 req/s only (~37 running rows: below the old threshold)  -> $OUT/serve_gpu.md ...
# Carry .devcarry.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader; } | tee "$OUT/call5.txt"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_cascade.py 2>&1 | tail -4 | tee -a "$OUT/call5.txt"
export MAX_LEN=4096
bash benchmarks/serve_gpu.sh --skip-startup --engines pagedserve --variants process-nocascade,process --rates 16 \
  --num-prompts 300 --prefix-len 2048 --budget-s 300 > /dev/null 2>&1
cat "$OUT/serve_gpu.md" | tee -a "$OUT/call5.txt"
