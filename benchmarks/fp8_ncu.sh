#!/usr/bin/env bash
# Why the FP8 decode launch reads its cache at ~2.2 TB/s where the bf16 one reads ~2.8 (issue 22, RESULTS.md
# session 39/41): the paged decode kernel at thr512's decode shape (llama-8b heads, contexts U[300, 1300]) under
# Nsight Compute, bf16 cache then FP8, plus the event timings and the FP8 tile sweep. Text reports in $OUT.
#   bash benchmarks/fp8_ncu.sh [ROWS...]      (default 448)
# The FP8 launch's SASS with its per-instruction counters (stall samples) in $OUT/sass_fp8_ROWS.csv (session 44).
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
      --section SourceCounters --import-source yes -o "/tmp/ncu_${kv}_$rows" -f \
      python3 attn_ncu.py --rows "$rows" $flag > "$OUT/ncu_${kv}_$rows.txt" 2>&1
    # the SASS with each instruction's counters (warp stall samples, instructions executed), one CSV
    [ $kv = fp8 ] && ncu -i "/tmp/ncu_${kv}_$rows.ncu-rep" --page source --csv --print-source sass \
      > "$OUT/sass_${kv}_$rows.csv" 2>&1
    ncu -i "/tmp/ncu_${kv}_$rows.ncu-rep" --page details >> "$OUT/ncu_${kv}_$rows.txt" 2>&1
    echo "ncu $kv $rows rc=$?"; grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Issued Ipc|No Eligible|Warp Cycles Per Issued" \
      "$OUT/ncu_${kv}_$rows.txt" | head -12
  done
done
cd ..
[ "${SWEEP:-1}" = 0 ] && exit 0
FP8_SWEEP=1 timeout 200 python3 benchmarks/fp8_attn_probe.py > "$OUT/fp8_sweep.txt" 2>&1; grep RESULT "$OUT/fp8_sweep.txt"
