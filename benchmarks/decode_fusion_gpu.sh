#!/usr/bin/env bash
# Issue 22, the decode attention fusions (rotary + KV store in the attention launch:
# TritonBackend.fused_decode; split-K merged in it: triton_paged_attention.MERGE_IN_KERNEL), in
# one device call on nvidia-h200 (~6 min, nothing to carry): b1_decode A/B per variant (decode_gpu.py
# models stage: default, fusedattn, fusedmerge; llama-1b and -8b), then the new kernel tests natively.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PAGEDSERVE_TEST_DEVICE=cuda
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/machine.txt"
timeout 230 python3 benchmarks/decode_gpu.py --stages models --variants default,fusedattn,fusedmerge \
    --thr "" > "$OUT/decode.txt" 2>&1; echo "DECODE rc=$?"
grep -E "b1_decode .* tok/s|ids equal|failed stages|Error" "$OUT/decode.txt"
grep -E "b1_decode .* tok/s|^(attention|rotary_store_kv|attention_reduce) |^total \(kernels\)" "$OUT/decode.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_paged_attention.py -k "rotary_store or merge" \
    > "$OUT/kernel_tests.txt" 2>&1; echo "KERNEL_TESTS rc=$? $(tail -1 "$OUT/kernel_tests.txt")"
