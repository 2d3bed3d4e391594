#!/usr/bin/env bash
# Issue 18 on the GPU machine, in parts that each fit a 10-minute command:
#   bash benchmarks/quant_gpu.sh checks   kernel checks + W4A16 GEMV sweep      (<= 7 min)
#   bash benchmarks/quant_gpu.sh quant    llama-8b dummy W4A16 then FP8 timings (<= 9 min)
#   bash benchmarks/quant_gpu.sh bf16     llama-8b dummy bf16 timings           (<= 4.5 min)
#   bash benchmarks/quant_gpu.sh all      all of it (about 20 min at most)
# Each stage runs in its own process (fresh GPU memory). CHECK / SWEEP / RESULT lines on
# stdout. N=... sets the requests of thrN (default 512); PYTHON=... the interpreter.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
N="${N:-512}"
part="${1:-all}"
if [[ "$part" == checks || "$part" == all ]]; then
    timeout 270 "$PY" benchmarks/quant_gpu.py check; echo "check exit $?"
    timeout 120 "$PY" benchmarks/quant_gpu.py sweep; echo "sweep exit $?"
fi
if [[ "$part" == quant || "$part" == all ]]; then
    for variant in w4a16 fp8; do
        timeout 265 "$PY" benchmarks/quant_gpu.py time "$variant" "$N"; echo "time $variant exit $?"
    done
fi
if [[ "$part" == bf16 || "$part" == all ]]; then
    timeout 265 "$PY" benchmarks/quant_gpu.py time bf16 "$N"; echo "time bf16 exit $?"
fi
