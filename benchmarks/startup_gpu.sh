#!/usr/bin/env bash
# Issue 22, start-up on nvidia-h200 (~150 s): the compile-ahead GPU test, then
# benchmarks/startup_gpu.py (cold / warm Triton cache, compile-ahead on / off, the Llama-3
# tokenizer loaded AutoTokenizer's way or the short way). Results under $OUT: console.txt,
# startup_gpu.{json,md}, startup_probes.log. Needs .devcarry/serve/ carried (serve_gpu.sh's).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; export OUT; mkdir -p "$OUT"
exec > >(tee "$OUT/console.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u; nproc
python3 -c "import torch, triton, transformers, tokenizers; print(torch.__version__, triton.__version__, transformers.__version__, tokenizers.__version__)"
TRITON_CACHE_DIR=/tmp/triton_test_ahead timeout 60 python3 -m pytest tests/kernels/test_compile_ahead.py -q -p no:cacheprovider 2>&1 | tail -5
BUDGET=${BUDGET:-165}   # seconds for the variants (the device's call limit is 600)
timeout $((BUDGET + 10 - SECONDS)) python3 benchmarks/startup_gpu.py --budget-s $((BUDGET - SECONDS)) "$@"
echo "exit $? after $SECONDS s"
