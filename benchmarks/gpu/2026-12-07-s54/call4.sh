#!/usr/bin/env bash
# Session 54, call 4: the cascade below its 64-row threshold (cascade_plan.CASCADE_MIN_ROWS): serving at 16 req/s ran
# ~37 rows sharing a 2,048-token prompt, which the plain launch reads once a row.
#   1. cascade_kernels.py at ROWS 8, 16, 32, 64: plain against cascade, us a layer (llama-8b heads, 2,048 shared)
#   2. cascade_gpu.py 0110 --mix with MIN_ROWS=8 at MAX_SEQS 32 (MIX_N 256) and MAX_SEQS 12 (MIX_N 96)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/call4.txt"
for r in ${KROWS:-8 16 32 64}; do
  ROWS=$r PYTHONPATH=$PWD timeout 90 python3 benchmarks/cascade_kernels.py 2>&1 | grep -E "RESULT|Error" \
    | tee -a "$OUT/call4.txt"
done
for cfg in "32 256" "12 96"; do
  set -- $cfg
  echo "== prefixmix MIN_ROWS=8 MAX_SEQS=$1 MIX_N=$2" | tee -a "$OUT/call4.txt"
  MIN_ROWS=8 MAX_SEQS=$1 MIX_N=$2 PYTHONPATH=$PWD timeout 200 python3 benchmarks/cascade_gpu.py 0110 --mix 2>&1 \
    | grep -E "RESULT|^prefixmix|Error|error" | tee -a "$OUT/call4.txt"
done
