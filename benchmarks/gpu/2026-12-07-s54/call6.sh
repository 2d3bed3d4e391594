#!/usr/bin/env bash
# Session 54, call 6: after the MixedGraphs split (worker/mixed_graphs.py): the CUDA engine tests of test_cascade.py
# (decode graphs, the mixed pieces captured and replayed with the cascade) and prefixmix once each way.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/call6.txt"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_cascade.py -k engine 2>&1 | tail -3 | tee -a "$OUT/call6.txt"
MIX_N=512 PYTHONPATH=$PWD timeout 100 python3 benchmarks/cascade_gpu.py 01 --mix 2>&1 | grep -E "RESULT|^prefixmix|Error|error" \
  | tee -a "$OUT/call6.txt"
