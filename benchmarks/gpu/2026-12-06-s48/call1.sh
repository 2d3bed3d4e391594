#!/usr/bin/env bash
# Session 48, call 1 (an H200 only): issue 22's standing figures at HEAD with the issue's harnesses.
#   bash call1.sh peers   -> peers.py llama-1b, llama-8b
#   bash call1.sh long    -> peers_long.py llama-8b (the cuDNN frontend wheel installed, as in session 31)
# Carry .devcarry (peers*.py from ../shared/bench, cfe/ from stage_devcarry.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/call1_$1.txt"
if [ "$1" = peers ]; then
  for model in llama-1b llama-8b; do
    PYTHONPATH=$PWD timeout 280 python3 .devcarry/peers.py pagedserve $model 2>&1 | grep -E "RESULT|Error" \
      | tee -a "$OUT/call1_$1.txt"
  done
else
  python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/*.whl
  PYTHONPATH=$PWD:/tmp/cfe_site timeout 560 python3 .devcarry/peers_long.py pagedserve llama-8b 2>&1 \
    | grep -E "RESULT|Error" | tee -a "$OUT/call1_$1.txt"
fi
