#!/usr/bin/env bash
# Why the FP8 decode launch reads its cache at ~2.2 TB/s where the bf16 one reads ~2.8 (issue 22, RESULTS.md
# session 39/41): the paged decode kernel at thr512's decode shape (llama-8b heads, contexts U[300, 1300]) under
# Nsight Compute, bf16 cache then FP8, plus the event timings and the FP8 tile sweep. Text reports in $OUT.
#   bash benchmarks/fp8_ncu.sh [ROWS...]      (default 448)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
cd benchmarks
for rows in "${@:-448}"; do
  for kv in bf16 fp8; do
    flag=; [ $kv = fp8 ] && flag=--fp8
    python3 attn_ncu.py --rows "$rows" $flag 2>&1 | tail -1 | tee -a "$OUT/timings.txt"
    timeout 240 ncu --clock-control none --kernel-name regex:_paged_attention_kernel --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      --section WarpStateStats --section SchedulerStats --section InstructionStats --section ComputeWorkloadAnalysis \
      --section SourceCounters python3 attn_ncu.py --rows "$rows" $flag > "$OUT/ncu_${kv}_$rows.txt" 2>&1
    echo "ncu $kv $rows rc=$?"; grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Issued Ipc|No Eligible|Warp Cycles Per Issued" \
      "$OUT/ncu_${kv}_$rows.txt" | head -12
  done
done
cd ..
FP8_SWEEP=1 timeout 200 python3 benchmarks/fp8_attn_probe.py > "$OUT/fp8_sweep.txt" 2>&1; grep RESULT "$OUT/fp8_sweep.txt"
