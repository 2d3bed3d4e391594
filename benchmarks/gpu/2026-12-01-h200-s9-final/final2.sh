#!/usr/bin/env bash
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:$PWD/.devcarry PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/final2}; mkdir -p "$OUT"
s=$(date +%s)
timeout 150 python3 -m pytest -q -p no:cacheprovider -rf tests/kernels/test_prefill_attention.py > "$OUT/prefill_tests.txt" 2>&1
echo "prefill tests rc=$? in $(( $(date +%s) - s )) s"; grep -E "^FAILED|passed|failed|Error" "$OUT/prefill_tests.txt" | head -20
grep -B5 -A25 "^____" "$OUT/prefill_tests.txt" | grep -E "^E |^____|test_prefill_attention.py:[0-9]+" | head -40
s=$(date +%s)
timeout 150 python3 benchmarks/decode_gpu.py --stages models --variants old,default,default2 --models llama-1b \
  --ab llama-1b --thr llama-1b > "$OUT/decode_gpu.txt" 2>&1
echo "decode_gpu rc=$? in $(( $(date +%s) - s )) s"
grep -v "^INFO\|^{\|host self\|beside the graph" "$OUT/decode_gpu.txt" | grep -E "b1_decode|thr512|first ids|Error|error" | cut -c1-200
