#!/usr/bin/env bash
# benchmarks/w4_gemv_gpu.py in one device call (<= 240 s): the one-row W4A16 launches checked
# and swept (old / atomic / split-order), then llama-8b b1_decode W4A16 old / bf16 / W4A16 best / best split-order.
# `bash benchmarks/w4_gemv_gpu.sh w4_handoff_gpu`: benchmarks/w4_handoff_gpu.py instead, with the same header.
set -uo pipefail
export PYTHONPATH=$PWD:$PWD/.devcarry PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null; date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/machine.txt"
python3 benchmarks/${1:-w4_gemv_gpu}.py
