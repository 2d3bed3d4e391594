#!/usr/bin/env bash
# Session 49, call 2: decode windows on a starved host. The engine process is pinned to core 0 beside a busy loop
# pinned there too (half a core for the engine's host thread: a slow host), peers.py llama-1b through peers_with.py,
# num_scheduler_steps 1 and 4 alternating, twice. Carry .devcarry (peers*.py from ../shared/bench).
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
(taskset -c 0 bash -c 'while :; do :; done' &) ; sleep 0.5
for i in 1 2; do for k in 1 4; do
  echo "== slow host k=$k run $i"
  PYTHONPATH=$PWD taskset -c 0 timeout 100 python3 benchmarks/peers_with.py num_scheduler_steps=$k -- .devcarry/peers.py \
    pagedserve llama-1b 2>&1 | grep -E "RESULT|Error" | grep -v startup
done; done | tee "$OUT/call2.txt"
pkill -f 'while :; do :; done'
