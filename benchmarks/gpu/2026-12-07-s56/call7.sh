#!/usr/bin/env bash
# Session 56, call 7: CASCADE_MAX_GROUPS 8 by default (call 6: prefixmix with 8 prompts 1.12x -> 1.38x): the cases
# it must not slow (prefix256: one group; prefixmix with 4 prompts) and the CUDA tests.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
{ nvidia-smi --query-gpu=name --format=csv,noheader; date -u +%FT%TZ; } 2>&1 | tee "$OUT/call7.txt"
PYTHONPATH=$PWD timeout 110 python3 benchmarks/cascade_gpu.py 01 2>&1 | grep -E "RESULT|^prefix256|Error|error" \
  | tee -a "$OUT/call7.txt"
echo "== prefixmix PROMPTS=4 ($(( $(date +%s) - T0 )) s)" | tee -a "$OUT/call7.txt"
PROMPTS=4 PYTHONPATH=$PWD timeout 120 python3 benchmarks/cascade_gpu.py 01 --mix 2>&1 \
  | grep -E "RESULT|^prefixmix|Error|error" | tee -a "$OUT/call7.txt"
LEFT=$(( ${BUDGET:-380} - ($(date +%s) - T0) ))
echo "== test_cascade ($(( $(date +%s) - T0 )) s, ${LEFT} s left)" | tee -a "$OUT/call7.txt"
[ "$LEFT" -gt 60 ] && timeout $(( LEFT - 5 )) python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_cascade.py \
  2>&1 | tail -3 | tee -a "$OUT/call7.txt"
