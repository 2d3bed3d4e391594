#!/usr/bin/env bash
# Session 55, call 2: cascade attention for several groups a step (several system prompts).
#   1. tests/kernels/test_cascade.py on CUDA (two groups in the kernel; the engine with two system prompts)
#   2. PROMPTS=4 cascade_gpu.py 0g1g0 --mix: prefixmix with 4 system prompts, cascade off / the largest group a
#      step only (session 54's one group) / every group, one engine
#   3. cascade_gpu.py 01: prefix256 (one group of 256 rows: the single-group path not slower)
#   4. peers.py llama-8b if time is left
# Carry .devcarry (peers*.py from ../shared/bench, cfe/ the cuDNN frontend wheel).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,driver_version --format=csv,noheader; git log --oneline -1; \
  date -u +%FT%TZ; } 2>&1 | tee "$OUT/call2.txt"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_cascade.py 2>&1 | tail -4 | tee -a "$OUT/call2.txt"
echo "== prefixmix PROMPTS=4 ($(( $(date +%s) - T0 )) s)" | tee -a "$OUT/call2.txt"
PROMPTS=4 PYTHONPATH=$PWD timeout 200 python3 benchmarks/cascade_gpu.py ${ORDER:-0g1g0} --mix 2>&1 \
  | grep -E "RESULT|^prefixmix|Error|error" | tee -a "$OUT/call2.txt"
echo "== prefix256 ($(( $(date +%s) - T0 )) s)" | tee -a "$OUT/call2.txt"
PYTHONPATH=$PWD timeout 130 python3 benchmarks/cascade_gpu.py 01 2>&1 \
  | grep -E "RESULT|^prefix256|Error|error" | tee -a "$OUT/call2.txt"
LEFT=$(( ${BUDGET:-580} - ($(date +%s) - T0) ))
echo "== peers llama-8b ($(( $(date +%s) - T0 )) s, ${LEFT} s left)" | tee -a "$OUT/call2.txt"
if [ "$LEFT" -gt 110 ]; then
  python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/*.whl
  PYTHONPATH=$PWD:/tmp/cfe_site timeout $(( LEFT - 5 )) python3 .devcarry/peers.py pagedserve llama-8b 2>&1 \
    | grep -E "RESULT|Error" | tee -a "$OUT/call2.txt"
fi
