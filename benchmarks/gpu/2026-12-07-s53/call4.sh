#!/usr/bin/env bash
# Session 53, call 4 (the machine of call 3, warm; PROGRAMS_PER_SM = 1 after call 3's sweep): the kernels again, then the
# engine A/B on prefix256 in the order 0110 (as run, one command line).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHONPATH=$PWD timeout 100 python3 benchmarks/cascade_kernels.py 2>&1 | grep RESULT | tee $OUT/call4.txt
PYTHONPATH=$PWD timeout 140 python3 benchmarks/cascade_gpu.py 0110 2>&1 | grep -E "RESULT|^prefix256|Error" | tee -a $OUT/call4.txt
