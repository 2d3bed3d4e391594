#!/usr/bin/env bash
# Issue 17 (pipeline parallelism) on nvidia-h200-x2, NVLink multicast off (KINDS.md). Two calls,
# each under 10 minutes:  bash benchmarks/pp_gpu.sh check   then   bash benchmarks/pp_gpu.sh perf
# or one (~6 min): bash benchmarks/pp_gpu.sh one   (check, then PP=2 timed alone)
# pp_gpu.py needs .devcarry/peers.py (a copy of ../shared/bench/peers.py).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/machine.txt"; date -u | tee -a "$OUT/machine.txt"
run() { timeout "$1" python3 "${@:2}" 2>&1 | tee -a "$OUT/log.txt" | grep -E "RESULT|Error|error" | tail -8; }
case ${1:-check} in
  check)   # exact ids on a tiny fp32 model; llama-8b bf16 ids of PP=2 against TP=1
    run 150 benchmarks/pp_gpu.py | tee -a "$OUT/results.txt"
    PP=2 run 200 benchmarks/tp_gpu.py ids 1 all "$OUT/ids_pp2.json"
    run 150 benchmarks/tp_gpu.py ids 1 all "$OUT/ids_tp1.json"
    python3 benchmarks/tp_gpu.py compare "$OUT/ids_tp1.json" "$OUT/ids_pp2.json" | tee -a "$OUT/results.txt" ;;
  one)     # check, then PP=2 timed alone
    bash "$0" check
    PP=2 run 280 benchmarks/tp_gpu.py peers 1 all | tee -a "$OUT/results.txt" ;;
  perf)    # thr512 and b1_decode: PP=2, then TP=2 next to it
    PP=2 run 280 benchmarks/tp_gpu.py peers 1 all | tee -a "$OUT/results.txt"
    run 280 benchmarks/tp_gpu.py peers 2 all | tee -a "$OUT/results.txt" ;;
esac
