#!/usr/bin/env bash
# Session 53, call 5 (same warm machine): peers_long.py llama-8b at HEAD (long64, b1 16k, ttft16k, prefix256).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/*.whl
PYTHONPATH=$PWD:/tmp/cfe_site timeout 170 python3 .devcarry/peers_long.py pagedserve llama-8b 2>&1 | grep -E "RESULT|Error" | tee $OUT/call5.txt
