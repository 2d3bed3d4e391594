#!/usr/bin/env bash
# Session 56, call 3 (the same warm H100 as call 2): why OVERLAP gained nothing at 256:256 (116.2 -> 115.4 us)
# while 256:128 gained 24 us and 64:64 9 us. Variants of cascade_kernels.py (all its variants, the overlap one
# against the cascade in the same process):
#   prio   the side stream at high priority (the prefix launch's blocks placed first as SMs free up)
#   s2     the prefix launch at 2 stages (less shared memory a block: placed beside decode blocks sooner)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for variant in prio s2 prio+s2; do
  for rm in 256:256 256:128; do
    echo "== $variant $rm" | tee -a "$OUT/call3.txt"
    VARIANT=$variant ROWS=${rm%:*} MEMBERS=${rm#*:} PYTHONPATH=$PWD timeout 100 python3 - <<'PY' 2>&1 \
      | grep -E "us a call|Error" | tee -a "$OUT/call3.txt"
import os
import torch
from pagedserve.attention import triton_cascade as tc
import benchmarks.cascade_kernels as ck
v = os.environ["VARIANT"]
if "prio" in v:
    low, high = torch.cuda.Stream.priority_range()
    tc._SIDE_STREAMS[torch.device("cuda", 0)] = torch.cuda.Stream(torch.device("cuda", 0), priority=high)
if "s2" in v:
    ck.CONFIGS[ck.DEFAULT] = (64, 64, 4, 2, 1)
ck.main()
PY
  done
done
