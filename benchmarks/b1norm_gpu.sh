#!/usr/bin/env bash
# Issue 22 session 10 (b1norm): the gemv's RMSNorm tail in one device call (<= 240 s). 1) the GPU
# kernel tests of the tail and the norm kernel (background); 2) benchmarks/norm_tail_gpu.py: the
# tail bit for bit against gemv + norm kernel at the llama-1b/8b o and down shapes (1/4/16 rows,
# many seeds), in a CUDA graph, and one-row us a call; 3) decode_gpu.py --stages models:
# llama-1b and llama-8b, variants default (the tail), main (before: norm launches on 8 warps),
# notail (norm launches on 4 warps): b1_decode, replay ms, kernels per replay, greedy ids. Raw under $OUT.
#   bash benchmarks/b1norm_gpu.sh               (carry .devcarry/peers.py)
#   bash benchmarks/b1norm_gpu.sh --cpu-smoke   (here: the scripts on the CPU, Triton's interpreter)
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
SMOKE=${1:-}
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null; date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/machine.txt"
if [ "$SMOKE" = "--cpu-smoke" ]; then
  echo "=== norm tail"
  timeout 600 $PY benchmarks/norm_tail_gpu.py --cpu-smoke 2>&1 | tee "$OUT/norm_tail.txt"
  echo "=== models"
  timeout 900 $PY benchmarks/decode_gpu.py --cpu-smoke --stages models --variants default,main,notail --thr "" \
    2>&1 | tee "$OUT/decode_gpu.txt" | grep --line-buffered -v "^INFO"
  exit 0
fi
PAGEDSERVE_TEST_DEVICE=cuda timeout 100 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_gemv_norm.py \
  tests/kernels/test_fused_ops.py tests/kernels/test_gemv.py > "$OUT/tests.txt" 2>&1 &
TESTS=$!
echo "=== norm tail"
timeout 75 $PY benchmarks/norm_tail_gpu.py 2>&1 | tee "$OUT/norm_tail.txt"
echo "=== models"
timeout 165 $PY benchmarks/decode_gpu.py --stages models --models llama-1b,llama-8b --ab llama-1b,llama-8b \
  --variants default,main,notail --thr "" 2>&1 | tee "$OUT/decode_gpu.txt" | grep --line-buffered -v "^INFO"
wait $TESTS
echo "=== kernel tests"; tail -n 4 "$OUT/tests.txt"
echo "=== summary"
grep -E "^CHECK|^time |check graph|b1_decode .* tok/s|first ids equal|total \(kernels\)|steps: wall|failed" \
  "$OUT/norm_tail.txt" "$OUT/decode_gpu.txt" | cut -c1-220
