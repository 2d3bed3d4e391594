#!/usr/bin/env bash
# Session 48, call 3: decode graph buckets every 32 rows above 256 (B: the working tree) against every 64
# (A: .devcarry/main, HEAD's pagedserve), peers.py alternating A B per model, PAIRS pairs each; then the
# top-k threshold's torch forms (sampler_sweep.py, one nucleus tile). Carry .devcarry (peers.py, main/).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/call3.txt"
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$log"
for model in ${MODELS:-llama-8b llama-1b}; do
  for pair in $(seq "${PAIRS:-3}"); do
    for tree in A B; do
      root=$PWD; [ $tree = A ] && root=$PWD/.devcarry/main
      echo "== $model pair $pair tree $tree $(date -u +%T)" | tee -a "$log"
      PYTHONPATH=$root timeout 150 python3 .devcarry/peers.py pagedserve $model 2>&1 | grep -E "RESULT|Error|captured" \
        | tee -a "$log"
    done
  done
done
TILES=8192x16 timeout 120 python3 benchmarks/sampler_sweep.py 128 512 2>&1 | grep -E "RESULT|Error" | tee -a "$log"
