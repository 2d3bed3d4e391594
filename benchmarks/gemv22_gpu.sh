#!/usr/bin/env bash
# Issue 22 (session 9): the bf16 one-row gemv with split K, in one device call (<= 240 s):
# every launch of the sweep checked against the fp32 reference (bf16 rounding, same bits twice
# and after the timed graph replays; down with its SiLU prologue) and timed on the ten
# llama-1b/8b shapes, then b1_decode of both models with the old table, the sweep's table, the
# old one again (one process), then tests/kernels/test_gemv.py on the GPU (bf16 included).
# Carry: .devcarry (peers.py). CPU proof: `bash benchmarks/gemv22_gpu.sh --cpu-smoke`.
set -uo pipefail
export PYTHONPATH=$PWD:$PWD/.devcarry PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gemv22}; mkdir -p "$OUT"; export OUT
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null; date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/machine.txt"
start=$(date +%s)
timeout 195 $PY benchmarks/decode_gpu.py --stages sweep,models --variants default,swept,default2 \
    --models llama-8b,llama-1b --ab llama-8b,llama-1b --thr "" "$@" > "$OUT/decode_gpu.txt" 2>&1
echo "decode_gpu rc=$? in $(( $(date +%s) - start )) s"
grep -v "^INFO\\|^{\\|host self\\|beside the graph" "$OUT/decode_gpu.txt" | grep -E \
    "MiB  cuBLAS|CHECK|GemvConfig\(|gemv table|b1_decode|^gemv:|total \(kernels\)|first ids|===|Error|error|rc=" | cut -c1-330
left=$(( 232 - ($(date +%s) - start) ))
if [ "$left" -gt 20 ] && [ "${1:-}" != "--cpu-smoke" ]; then
    timeout "$left" $PY -m pytest -x -q -p no:cacheprovider tests/kernels/test_gemv.py > "$OUT/test_gemv.txt" 2>&1
    echo "test_gemv rc=$? (GPU, ${left} s allowed)"; tail -3 "$OUT/test_gemv.txt"
fi
echo "total $(( $(date +%s) - start )) s"
