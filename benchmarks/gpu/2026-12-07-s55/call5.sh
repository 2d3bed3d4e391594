#!/usr/bin/env bash
# Session 55, call 5: what a step's rows outside its cascade groups pay (prefixmix's `g` was 0.98x): the cascade's
# two launches at llama-8b heads, 2,048 shared keys, with only MEMBERS of ROWS rows in the group (the others read
# their whole context in the cascade's decode launch), against the plain launch, and the cascade with the plain
# launch's tiles and plan (cascade_plaintiles); then prefixmix with 8 system prompts, cascade off / on.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/call5.txt"
for rm in ${SHAPES:-256:256 256:192 256:128 256:64 256:32 256:8 64:64 64:16 64:8 32:8}; do
  ROWS=${rm%:*} MEMBERS=${rm#*:} PYTHONPATH=$PWD timeout 100 python3 benchmarks/cascade_kernels.py 2>&1 \
    | grep -E "us a call|Error" | tee -a "$OUT/call5.txt"
done
# prefixmix with 8 system prompts: 4 groups a step take the cascade (about half the rows), the others not
echo "== prefixmix PROMPTS=8" | tee -a "$OUT/call5.txt"
PROMPTS=8 PYTHONPATH=$PWD timeout 150 python3 benchmarks/cascade_gpu.py ${ORDER:-010} --mix 2>&1 \
  | grep -E "RESULT|^prefixmix|Error|error" | tee -a "$OUT/call5.txt"
