#!/usr/bin/env bash
# The sampler A/B on one machine (session 46): the old tree staged in .devcarry/main by
# `git archive OLD pagedserve | tar -x -C .devcarry/main`, against this tree. First the CUDA tests of the
# sampling paths, then benchmarks/sampler_gpu.py (the sampler alone at 128 / 512 rows, both trees), then
# thr512 with sampled settings (penalty_mix.py kinds) per model, old / new / old / new. Carry .devcarry.
#   [MODELS="llama-1b llama-8b"] [KINDS=base,sampled,sampled_k,min_p] bash benchmarks/sampler_ab_gpu.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader | tee "$OUT/sampler.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/unit/test_nucleus.py tests/kernels/test_sampler_memory.py \
  tests/unit/test_sampler.py -s 2>&1 | grep -E "passed|failed|Error|sampler peak|^FAILED" | tee -a "$OUT/sampler.txt"
for tree in .devcarry/main .; do
  TREE=$tree SETTINGS=greedy,temperature,top_p,top_k_top_p,min_p PARTS=0 timeout 150 python3 benchmarks/sampler_gpu.py 128 512 \
    2>&1 | grep -E "RESULT|Error" | grep -v '"kernel": false' | tee -a "$OUT/sampler.txt"
done
TREE=. SETTINGS=top_p PARTS=0 PROFILE=1 timeout 60 python3 benchmarks/sampler_gpu.py 512 > "$OUT/sampler_profile.txt" 2>&1
for model in ${MODELS:-llama-1b llama-8b}; do
  for tree in .devcarry/main . .devcarry/main .; do
    TREE=$tree timeout 150 python3 benchmarks/penalty_mix.py --model "$model" --rounds 1 --kinds "${KINDS:-base,sampled,sampled_k,min_p}" \
      2>&1 | grep -E "RESULT|Error|error" | tee -a "$OUT/sampler.txt"
  done
done
