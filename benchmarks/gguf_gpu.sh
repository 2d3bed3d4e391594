#!/usr/bin/env bash
# Issue 19's GPU part (ggufgpu) in one device call (<= 240 s): triton_gguf's kernel tests on the
# GPU, then benchmarks/gguf_gpu.py: the default model (its first 4 layers: .devcarry/gguf_model,
# made by `python benchmarks/gguf_gpu.py prepare`) packed against dequantized on CUDA, bf16:
# greedy ids against fp32's, b1_decode, the 64-prompt batch, weight bytes. Raw under $OUT.
#   bash benchmarks/gguf_gpu.sh               (carry .devcarry/gguf_model, ~40 MB)
#   bash benchmarks/gguf_gpu.sh --cpu-smoke   (here: the script on the CPU, Triton's interpreter)
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
SMOKE=${1:-}
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null; date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/machine.txt"
echo "=== kernel tests"
if [ "$SMOKE" = "--cpu-smoke" ]; then
  TRITON_INTERPRET=1 timeout 300 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_gguf_triton.py -k "gemv_default or route" 2>&1 | tail -3 | tee "$OUT/tests.txt"
  echo "=== model"
  timeout 1500 $PY benchmarks/gguf_gpu.py run --cpu-smoke --timeout 120 2>&1 | tee "$OUT/gguf_gpu.txt" | grep --line-buffered -v "^INFO"
else
  # two processes (the compiles are CPU-bound; the Triton cache is shared safely): the GEMV's
  # parametrized matrix, and the rest
  PAGEDSERVE_TEST_DEVICE=cuda timeout 75 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_gguf_triton.py \
    -k "test_gemv and not default" > "$OUT/tests_gemv.txt" 2>&1 &
  PAGEDSERVE_TEST_DEVICE=cuda timeout 75 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_gguf_triton.py \
    -k "not (test_gemv and not default)" > "$OUT/tests_rest.txt" 2>&1
  wait
  tail -n 5 "$OUT/tests_gemv.txt" "$OUT/tests_rest.txt" | tee "$OUT/tests.txt"
  echo "=== model"
  timeout 155 $PY benchmarks/gguf_gpu.py run --timeout 50 2>&1 | tee "$OUT/gguf_gpu.txt" | grep --line-buffered -v "^INFO"
fi
