#!/usr/bin/env bash
# Lead's final check of merged main (session 10), one call: GPU kernel tests of what changed (W4A16
# split K, every GGUF type's kernels, the gemv), W4A16 vs bf16 b1 on llama-8b (the relaxed counter
# reset end to end), b1 of llama-1b / llama-8b on the default path.
set -uo pipefail
cd "$(dirname "$0")/../../.."
export PYTHONPATH=$PWD:$PWD/.devcarry PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/final}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/machine.txt"
s=$(date +%s)
PAGEDSERVE_TEST_DEVICE=cuda timeout 170 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_gemv.py \
  tests/kernels/test_quant_kernels.py tests/kernels/test_gguf_triton.py tests/kernels/test_argmax.py > "$OUT/kernel_tests.txt" 2>&1
echo "kernel tests rc=$? in $(( $(date +%s) - s )) s"; grep -E "FAILED|passed|failed" "$OUT/kernel_tests.txt" | tail -8
s=$(date +%s)
for st in e2e_default e2e_bf16; do
  timeout 60 python3 benchmarks/w4_gemv_gpu.py $st > "$OUT/w4_$st.txt" 2>&1
  echo "w4 $st rc=$?"; grep -E "^RESULT|graph_replay|linear_us|STAGE|rror" "$OUT/w4_$st.txt" | cut -c1-200
done
echo "w4 in $(( $(date +%s) - s )) s"
s=$(date +%s)
timeout 110 python3 benchmarks/decode_gpu.py --stages models --variants default --models llama-1b,llama-8b \
  --thr "" > "$OUT/decode_gpu.txt" 2>&1
echo "decode_gpu rc=$? in $(( $(date +%s) - s )) s"
grep -v "^INFO\|^{\|host self\|beside the graph" "$OUT/decode_gpu.txt" | grep -E "b1_decode|total \(kernels\)|Error|error" | cut -c1-200
