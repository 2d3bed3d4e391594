#!/usr/bin/env bash
# Issue 17 (pipeline parallelism) on nvidia-h200-x2, NVLink multicast off (KINDS.md). Two calls,
# each under 10 minutes:  bash benchmarks/pp_gpu.sh check   then   bash benchmarks/pp_gpu.sh perf
# Needs .devcarry/peers.py (a copy of ../shared/bench/peers.py), as tp_gpu.sh.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/machine.txt"; date -u | tee -a "$OUT/machine.txt"
run() { timeout "$1" python3 benchmarks/pp_gpu.py "${@:2}" 2>&1 | tee -a "$OUT/log.txt" | grep -E "RESULT|Error|error" | tail -8; }
case ${1:-check} in
  check)
    run 150 exact | tee -a "$OUT/results.txt"
    run 200 ids 1 2 "$OUT/ids_pp2.json"
    run 150 ids 1 1 "$OUT/ids_tp1.json"
    python3 benchmarks/pp_gpu.py compare "$OUT/ids_tp1.json" "$OUT/ids_pp2.json" | tee -a "$OUT/results.txt" ;;
  perf)
    run 280 peers 1 2 | tee -a "$OUT/results.txt"    # PP=2
    run 280 peers 2 1 | tee -a "$OUT/results.txt" ;; # TP=2, same workloads, next to it
esac
