#!/usr/bin/env bash
# benchmarks/w4_gemv_gpu.py in one device call (<= 240 s): llama-8b b1_decode W4A16 with main's fenced split-K
# counter reset / bf16 / W4A16 with the relaxed reset, then the default one-row launches checked and timed both ways.
set -uo pipefail
export PYTHONPATH=$PWD:$PWD/.devcarry PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null; date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/machine.txt"
python3 benchmarks/w4_gemv_gpu.py
