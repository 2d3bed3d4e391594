#!/usr/bin/env bash
# Penalties A/B on one machine (benchmarks/penalty_mix.py): the old tree staged in .devcarry/main by
# `git archive OLD pagedserve | tar -x -C .devcarry/main`, against this tree, interleaved; first the CUDA
# self-check and the sampler's memory test. Carry .devcarry. Figures in $OUT/pen.txt.
#   [MODELS="llama-1b llama-1b"] bash benchmarks/penalty_gpu.sh
# (session 44 ran it with the FP8 ncu export between the models: see benchmarks/gpu/2026-12-06-s44/README.txt)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader | tee "$OUT/pen.txt"
python3 benchmarks/penalty_mix.py --selfcheck 2>&1 | grep -E "RESULT|Error" | tee -a "$OUT/pen.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_sampler_memory.py 2>&1 | tail -3 | tee -a "$OUT/pen.txt"
run() { timeout "$1" env TREE="$2" python3 benchmarks/penalty_mix.py --model "$3" --rounds 1 2>&1 \
  | grep -E "RESULT|Error|error" | tee -a "$OUT/pen.txt"; }
for model in ${MODELS:-llama-1b llama-1b}; do
  run 130 .devcarry/main "$model"
  run 120 . "$model"
done
