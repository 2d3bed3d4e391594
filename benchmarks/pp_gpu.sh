#!/usr/bin/env bash
# Issue 17 (pipeline parallelism) on nvidia-h200-x2, NVLink multicast off (KINDS.md).
#   bash benchmarks/pp_gpu.sh one     (~4.5 min): check, then llama-8b PP=2 timed with each stage's
#                                     CUDA graphs and eagerly (ENFORCE_EAGER=1), host phases of rank 0
#   bash benchmarks/pp_gpu.sh check   (~2 min): exact ids on a tiny fp32 model (PP=1, PP=2 graphs,
#                                     PP=2 eager); llama-8b bf16 ids of PP=2 (graphs) against TP=1
#   bash benchmarks/pp_gpu.sh perf    (~2.5 min): thr512 / b1_decode / ttft1024, PP=2 then TP=2
# DRY=1 runs every step on CPU with tiny models (the script's own check; no timing meaning).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${DRY:-}" = 1 ]; then PY=${PY:-/work/main/.venv/bin/python}; else PY=python3
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/machine.txt"; fi
date -u | tee -a "$OUT/machine.txt"; git log -1 --format=%h 2>/dev/null | tee -a "$OUT/machine.txt"
run() { timeout "$1" "$PY" "${@:2}" 2>&1 | tee -a "$OUT/log.txt" | grep -E "RESULT|Error|error" | tail -8; }
case ${1:-check} in
  check)   # exact ids on a tiny fp32 model; llama-8b bf16 ids of PP=2 against TP=1
    run 120 benchmarks/pp_gpu.py | tee -a "$OUT/results.txt"
    PP=2 run 120 benchmarks/tp_gpu.py ids 1 all "$OUT/ids_pp2.json"
    run 100 benchmarks/tp_gpu.py ids 1 all "$OUT/ids_tp1.json"
    "$PY" benchmarks/tp_gpu.py compare "$OUT/ids_tp1.json" "$OUT/ids_pp2.json" | tee -a "$OUT/results.txt" ;;
  one)     # check, then PP=2 timed with graphs and without
    bash "$0" check
    PP=2 run 150 benchmarks/tp_gpu.py peers 1 all | tee -a "$OUT/results.txt"
    ENFORCE_EAGER=1 PP=2 run 150 benchmarks/tp_gpu.py peers 1 all | tee -a "$OUT/results.txt" ;;
  perf)    # thr512 and b1_decode: PP=2, then TP=2 next to it
    PP=2 run 150 benchmarks/tp_gpu.py peers 1 all | tee -a "$OUT/results.txt"
    run 150 benchmarks/tp_gpu.py peers 2 push4m | tee -a "$OUT/results.txt" ;;   # TP=2 as shipped
esac
date -u | tee -a "$OUT/machine.txt"
