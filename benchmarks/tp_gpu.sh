#!/usr/bin/env bash
# Issue 9 in one device call on nvidia-h200-x2 (NVLink multicast off, as KINDS.md asks).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/machine.txt"; date -u | tee -a "$OUT/machine.txt"
run() { timeout "$1" python3 benchmarks/tp_gpu.py "${@:2}" 2>&1 | tee -a "$OUT/log.txt" | grep -E "RESULT|Error|error" | tail -8; }
run 120 ids 2 "$OUT/ids_tp2.json"
EAGER2=0
[ -s "$OUT/ids_tp2.json" ] || { echo "TP=2 with graphs failed; retrying eager"; EAGER2=1; ENFORCE_EAGER=1 run 100 ids 2 "$OUT/ids_tp2.json"; }
run 90 ids 1 "$OUT/ids_tp1.json"
python3 benchmarks/tp_gpu.py compare "$OUT/ids_tp1.json" "$OUT/ids_tp2.json" | tee -a "$OUT/results.txt"
[ "${SKIP_TP1_PEERS:-0}" = 1 ] || run 120 peers 1 | tee -a "$OUT/results.txt"
ENFORCE_EAGER=$EAGER2 run 140 peers 2 | tee -a "$OUT/results.txt"
