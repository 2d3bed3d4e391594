#!/bin/bash
# Issue 22, the decode tail (session 7, branch tail22): one device call, <= 150 s on one H200.
#   bash benchmarks/tail_gpu.sh            (repo root; carry .devcarry/peers.py for the engine part)
#   bash benchmarks/tail_gpu.sh --cpu-smoke (tiny shapes on the CPU through the interpreter)
# 1. attn_gpu.py --stages tail --quick (~45 s, cut at 70): every split rule against the fp32
#    reference, then the decode kernel alone at long64 / thr512 / batch-1 shapes: legacy rule vs
#    chunked (16 / 32 tiles) vs no split; us, KV GB/s. (Without --quick: + a tile sweep, ~90 s.)
# 2. step_profile.py long64, the new default (chunked) only (~40 s, cut at 70): its
#    decode_tail ms a step against the legacy rule's 20.62 (2026-12-01 03:37, same command).
# Raw output under $OUT (tail.txt, attn_gpu.jsonl, steps.txt) when set.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/tail_gpu_out}
mkdir -p "$OUT"
export OUT
if [ "${1:-}" = "--cpu-smoke" ]; then
  timeout 600 python3 benchmarks/attn_gpu.py --cpu-smoke --quick --stages tail 2>&1 | tee "$OUT/tail.txt" | tail -30
  timeout 600 python3 benchmarks/step_profile.py --cpu-smoke --workload long64 --variants default,legacy 2>&1 \
    | tee "$OUT/steps.txt" | grep RESULT
  exit 0
fi
nvidia-smi --query-gpu=name,clocks.max.mem,memory.total --format=csv,noheader
timeout 70 python3 benchmarks/attn_gpu.py --stages tail --quick 2>&1 | tee "$OUT/tail.txt" \
  | grep -v "^RESULT" | tail -80
grep '"stage": "tail' "$OUT/tail.txt" | cut -c1-260
timeout 70 python3 benchmarks/step_profile.py --workload long64 --variants default 2>&1 \
  | tee "$OUT/steps.txt" | grep RESULT
