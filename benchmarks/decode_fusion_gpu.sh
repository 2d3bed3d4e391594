#!/usr/bin/env bash
# Issue 22, the decode attention fusions (rotary + KV store in the attention launch:
# TritonBackend.fused_decode; split-K merged in it: triton_paged_attention.MERGE_IN_KERNEL), in
# one device call on nvidia-h200 (~6 min, nothing to carry): b1_decode A/B per variant (decode_gpu.py
# models stage: default, fusedattn, fusedmerge; llama-1b and -8b), then the new kernel tests natively.
# `bash benchmarks/decode_fusion_gpu.sh abab` (the next call, session 12's open question): default and
# fusedmerge alternated three times on each model in one process (~4 min), whether llama-1b's
# b1_decode host gap follows the variant or the engine's position (RESULTS.md, session 12). Turning
# the switches on also needs bf16_agreement.py with them on (the GGUF staged on the device).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PAGEDSERVE_TEST_DEVICE=cuda
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/machine.txt"
VARIANTS=default,fusedattn,fusedmerge
[ "${1:-}" = abab ] && VARIANTS=default,fusedmerge,default3,fusedmerge,default,fusedmerge
timeout 300 python3 benchmarks/decode_gpu.py --stages models --ab llama-1b,llama-8b --variants $VARIANTS \
    --thr "" > "$OUT/decode.txt" 2>&1; echo "DECODE rc=$?"
grep -E "b1_decode .* tok/s|ids equal|failed stages|Error" "$OUT/decode.txt"
grep -E "b1_decode .* tok/s|^(attention|rotary_store_kv|attention_reduce) |^total \(kernels\)" "$OUT/decode.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_paged_attention.py -k "rotary_store or merge" \
    > "$OUT/kernel_tests.txt" 2>&1; echo "KERNEL_TESTS rc=$? $(tail -1 "$OUT/kernel_tests.txt")"
