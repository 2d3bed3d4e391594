#!/usr/bin/env bash
# Issue 18 on the GPU machine: kernel checks, then llama-8b dummy timings for bf16, W4A16
# and FP8, each in its own process (fresh GPU memory). RESULT / CHECK lines on stdout.
# Usage: bash benchmarks/quant_gpu.sh [N]   (N requests for thrN, default 512)
set -u
cd "$(dirname "$0")/.."
N="${1:-512}"
PY="${PYTHON:-python}"
timeout 300 "$PY" benchmarks/quant_gpu.py check; echo "check exit $?"
timeout 120 "$PY" benchmarks/quant_gpu.py sweep; echo "sweep exit $?"
for variant in w4a16 fp8 bf16; do
    timeout 240 "$PY" benchmarks/quant_gpu.py time "$variant" "$N"; echo "time $variant exit $?"
done
