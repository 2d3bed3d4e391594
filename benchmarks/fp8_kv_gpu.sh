#!/usr/bin/env bash
# kv_cache_dtype fp8 on a GPU: its tests on CUDA (the kernels against the torch reference, greedy ids
# against transformers over FP8-rounded K/V), then peers.py on llama-8b with the model's bf16 cache (A)
# and an FP8 E4M3 cache (B), one process each (benchmarks/peers_with.py adds the engine argument).
#   bash benchmarks/fp8_kv_gpu.sh [tests] [a] [b] ...     (carry .devcarry/peers.py)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$SECONDS
left() { echo $(( ${LIMIT:-570} - (SECONDS - START) )); }
na=0 nb=0
for mode in "$@"; do
  case $mode in
    tests) PAGEDSERVE_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_kv.py \
             tests/models/test_fp8_kv_cache.py 2>&1 | tee "$OUT/tests.txt" | tail -4 ;;
    a|b) [ "$(left)" -lt 150 ] && { echo "SKIP $mode (time)"; continue; }
         if [ $mode = a ]; then label=A$((++na)); kw=kv_cache_dtype=auto; else label=B$((++nb)); kw=kv_cache_dtype=fp8; fi
         PYTHONPATH=$PWD timeout "$(left)" python3 benchmarks/peers_with.py $kw -- .devcarry/peers.py pagedserve llama-8b \
           > "$OUT/p8-$label.log" 2>&1
         echo "rc=$? $label"; grep -h "RESULT\|KV cache:" "$OUT/p8-$label.log" | cut -c1-260 ;;
    *) echo "unknown mode $mode" ;;
  esac
done
echo "done in $((SECONDS - START)) s"
