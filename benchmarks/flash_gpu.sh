#!/bin/bash
# Issue 22, the Triton prefill attention kernel on sm_90 (session 8, branch flash22): one device
# call, ~190 s on one H200 (cut at 235).
#   bash benchmarks/flash_gpu.sh             (repo root; carry .devcarry/peers.py for the engine part)
#   bash benchmarks/flash_gpu.sh --cpu-smoke (tiny shapes on the CPU through the interpreter, ~3 min)
# flash_gpu.py: check (attn_gpu.py's, then every launch variant against the fp32 reference; exit 1
# on a failure), micro (TFLOP/s per variant: chunk8k after 4k/8k/12k, fresh16k, a long64-like
# launch), engine (llama-8b: ttft16k by backend mode x old/new tiles, long64 new/old/new with the
# prefill steps timed). Raw output under $OUT (flash.txt, attn_gpu.jsonl) when set.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/flash_gpu_out}
mkdir -p "$OUT"
export OUT
if [ "${1:-}" = "--cpu-smoke" ]; then
  timeout 900 python3 benchmarks/flash_gpu.py --cpu-smoke 2>&1 | tee "$OUT/flash.txt" | grep -v "^RESULT" | tail -30
  exit "${PIPESTATUS[0]}"
fi
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,memory.total --format=csv,noheader
timeout 235 python3 benchmarks/flash_gpu.py 2>&1 | tee "$OUT/flash.txt" | grep -v "^RESULT" | tail -60
rc=${PIPESTATUS[0]}
grep -E '"stage": "(check|flash_check)"' "$OUT/flash.txt" | cut -c1-300
echo "flash_gpu.py exit status: $rc"
exit "$rc"
