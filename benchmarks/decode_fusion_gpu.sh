#!/usr/bin/env bash
# Issue 22, the decode attention fusions (rotary + KV store in the attention launch:
# TritonBackend.fused_decode; split-K merged in it: triton_paged_attention.MERGE_IN_KERNEL), in
# one device call on nvidia-h200 (~6-7 min, nothing to carry): the kernel tests natively, the fp32
# parity tests against transformers with both fusions on, then b1_decode A/B per variant
# (decode_gpu.py models stage: default, fusedattn, merge, fusedmerge, default3; llama-1b and -8b).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PAGEDSERVE_TEST_DEVICE=cuda
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/machine.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_paged_attention.py tests/kernels/test_store_kv.py \
    > "$OUT/kernel_tests.txt" 2>&1; echo "KERNEL_TESTS rc=$? $(tail -1 "$OUT/kernel_tests.txt")"
timeout 170 python3 - > "$OUT/parity_fused.txt" 2>&1 <<'PY'
import sys
import pytest
from pagedserve.attention import triton_paged_attention as tpa
from pagedserve.attention.backend import TritonBackend
TritonBackend.fused_decode = tpa.MERGE_IN_KERNEL = True
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/models/test_parity.py"]))
PY
echo "PARITY_FUSED rc=$? $(tail -1 "$OUT/parity_fused.txt")"
timeout 300 python3 benchmarks/decode_gpu.py --stages models --variants default,fusedattn,merge,fusedmerge,default3 \
    --thr "" > "$OUT/decode.txt" 2>&1; echo "DECODE rc=$?"
grep -E "b1_decode .* tok/s|ids equal|failed stages|Error" "$OUT/decode.txt"
grep -E "b1_decode .* tok/s|^(attention|rotary_store_kv|attention_reduce) |^total \(kernels\)" "$OUT/decode.txt"
