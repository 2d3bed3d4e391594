#!/usr/bin/env bash
# Session 51, call 1 (call 2 is session 49's call3.sh: peers_long llama-8b at K=1 then 4):
#   1. benchmarks/topk_gpu.py: torch.topk's k-th value against a two-stage select (top_k's cost) -> $OUT/topk.txt
#   2. s49/call1.sh: window_gpu.py 4 (rows of 8-96 tokens), then peers.py llama-1b K=1 / 4, PAIRS_1B pairs
#      (default 1 here), no llama-8b                                                          -> $OUT/call1.txt
# Carry .devcarry (peers*.py from ../shared/bench).
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 90 python3 benchmarks/topk_gpu.py 128 512 2>&1 | tail -6 | tee "$OUT/topk.txt"
PAIRS_1B=${PAIRS_1B:-1} PAIRS_8B=0 bash benchmarks/gpu/2026-12-06-s49/call1.sh
