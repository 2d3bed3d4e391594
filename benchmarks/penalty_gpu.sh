#!/usr/bin/env bash
# Session 44's device call: penalties without lockstep (benchmarks/penalty_mix.py, the old tree staged
# in .devcarry/main by `git archive OLD pagedserve | tar -x -C .devcarry/main`), then the FP8 decode
# launch's SASS under ncu (benchmarks/fp8_ncu.sh). Carry .devcarry. Figures in $OUT.
#   bash benchmarks/penalty_gpu.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader | tee "$OUT/pen.txt"
python3 benchmarks/penalty_mix.py --selfcheck 2>&1 | grep -E "RESULT|Error" | tee -a "$OUT/pen.txt"
run() { timeout "$1" env TREE="$2" python3 benchmarks/penalty_mix.py --model "$3" --rounds 1 2>&1 \
  | grep -E "RESULT|Error|error" | tee -a "$OUT/pen.txt"; }
run 120 .devcarry/main llama-1b
run 100 . llama-1b
SWEEP=0 timeout 170 bash benchmarks/fp8_ncu.sh 448 2>&1 | tail -24
run 110 . llama-8b
run 150 .devcarry/main llama-8b
