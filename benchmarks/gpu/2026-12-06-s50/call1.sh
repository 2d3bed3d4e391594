#!/usr/bin/env bash
# Session 50, call 1: decode windows whose rows leave at their last token (window_row_steps) and the window cap,
# through session 49's two scripts (they run HEAD's code and benchmarks/window_gpu.py):
#   1. s49/call1.sh: window_gpu.py 4 (with rows of 8-96 tokens now), then peers.py llama-1b K=1 / 4, PAIRS_1B pairs
#      (default 1 here), no llama-8b                                                      -> $OUT/call1.txt
#   2. s49/call3.sh: peers_long.py llama-8b K=1 then 4 (prefix256: the cap's A/B)          -> $OUT/call3.txt
# Carry .devcarry (peers*.py from ../shared/bench, cfe/ from stage_devcarry.sh).
S49=benchmarks/gpu/2026-12-06-s49
PAIRS_1B=${PAIRS_1B:-1} PAIRS_8B=0 bash $S49/call1.sh
bash $S49/call3.sh
