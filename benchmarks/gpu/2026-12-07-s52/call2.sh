#!/usr/bin/env bash
# Session 52, call 2: cascade attention (attention/triton_cascade.py) on the GPU.
#   1. the cascade's kernel tests and the paged attention tests on CUDA (bf16 / fp16 / fp32)   -> $OUT/call2.txt
#   2. benchmarks/cascade_gpu.py: prefix256 llama-8b, cascade off / on in one engine, and the same-tokens check
#   3. peers_long.py llama-8b at HEAD's defaults (cascade on), one process (cuDNN frontend installed)
#   4. peers.py llama-8b at HEAD's defaults (thr512 has no shared prefix: level expected), one process
# Carry .devcarry (peers*.py from ../shared/bench, cfe/ from stage_devcarry.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv,noheader | tee "$OUT/call2.txt"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_cascade.py tests/kernels/test_paged_attention.py \
  2>&1 | tail -4 | tee -a "$OUT/call2.txt"
PYTHONPATH=$PWD timeout 200 python3 benchmarks/cascade_gpu.py ${ORDER:-01100110} 2>&1 \
  | grep -E "RESULT|^prefix256|Error|error" | tee -a "$OUT/call2.txt"
python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/*.whl
echo "== peers_long ($(( $(date +%s) - T0 )) s)" | tee -a "$OUT/call2.txt"
PYTHONPATH=$PWD:/tmp/cfe_site timeout ${LONG_S:-190} python3 .devcarry/peers_long.py pagedserve llama-8b 2>&1 \
  | grep -E "RESULT|Error" | tee -a "$OUT/call2.txt"
LEFT=$(( ${BUDGET:-580} - ($(date +%s) - T0) ))
echo "== peers llama-8b ($(( $(date +%s) - T0 )) s, ${LEFT} s left)" | tee -a "$OUT/call2.txt"
[ "$LEFT" -gt 90 ] && PYTHONPATH=$PWD timeout $LEFT python3 .devcarry/peers.py pagedserve llama-8b 2>&1 \
  | grep -E "RESULT|Error" | tee -a "$OUT/call2.txt"
