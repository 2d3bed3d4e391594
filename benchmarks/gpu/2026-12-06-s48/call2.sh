#!/usr/bin/env bash
# Session 48, call 2: the top-k threshold's torch forms (sampler_sweep.py, one nucleus tile), then on an
# H200 only issue 22's long-context figures at HEAD (peers_long.py llama-8b, the cuDNN frontend installed).
# Carry .devcarry (peers*.py from ../shared/bench, cfe/).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
gpu=$(nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/call2.txt")
TILES=8192x16 timeout 120 python3 benchmarks/sampler_sweep.py 128 512 2>&1 | grep -E "RESULT|Error" | tee -a "$OUT/call2.txt"
if [[ "$gpu" == *H200* ]]; then
  python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/*.whl
  PYTHONPATH=$PWD:/tmp/cfe_site timeout 440 python3 .devcarry/peers_long.py pagedserve llama-8b 2>&1 \
    | grep -E "RESULT|Error" | tee -a "$OUT/call2.txt"
fi
