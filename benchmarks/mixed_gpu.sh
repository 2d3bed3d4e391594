#!/usr/bin/env bash
# Issue 22, piecewise CUDA graphs for mixed steps on nvidia-h200, one call (~3 min, stops itself
# before 198 s): benchmarks/mixed_gpu.py first (start-up, graph replay vs eager check, ids, per-step
# A/B of mixed steps: what decides the default; ~70 s, at most 100 s), then, with >= 90 s left, the
# online-serving A/B (serve_gpu.sh, pagedserve only, the engine process with then without
# PAGEDSERVE_MIXED_GRAPHS=1, 8 req/s, 64 prompts; every step's timing saved:
# $OUT/serve/steps_<variant>_8.json, rows (begin, end, tokens, running, deliver_s), broken down by
# benchmarks/steps_breakdown.py). SERVE=0: the first part alone. Carry: .devcarry (peers.py for the
# model config; serve/ for the tokenizer and the server wheels).
# CPU proof: PYTHONPATH=$PWD python3 benchmarks/mixed_gpu.py --cpu-smoke
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u; git log --oneline -1
timeout 100 python3 benchmarks/mixed_gpu.py --model llama-8b 2>&1 | tee "$OUT/mixed_gpu.txt"
echo "mixed_gpu.py exit ${PIPESTATUS[0]} after $SECONDS s"
if [ "${SERVE:-1}" = 1 ] && [ $SECONDS -le 108 ]; then
  OUT="$OUT/serve" timeout $((197 - SECONDS)) bash benchmarks/serve_gpu.sh --skip-startup --engines pagedserve \
    --variants process-mixedgraph,process-nomixed --rates 8 --num-prompts 64 --budget-s $((190 - SECONDS)) --min-engine-s 45
  echo "serve_gpu.sh exit $? after $SECONDS s"
  python3 benchmarks/steps_breakdown.py "$OUT"/serve/steps_*.json 2>&1 | tee "$OUT/steps_breakdown.txt"
fi
