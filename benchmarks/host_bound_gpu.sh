#!/usr/bin/env bash
# Issue 22: is llama-1b thr512 bound by the host or the device, and does the CPU the engine runs on
# move it? thr_spread.py (one fresh process a run) unpinned and pinned to each half of the machine's
# CPUs, alternating, PAIRS rounds; each run reports host_wait_s (the engine thread waiting for a
# step's sampled ids: ~0 when the host is the bound) beside out tok/s and the decode span.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/hostbound}
MODEL=${MODEL:-llama-1b}
mkdir -p "$OUT" /tmp/thr_wd && ln -sfn "$PWD/.devcarry" /tmp/thr_wd/.devcarry
nproc; lscpu | grep -iE "^numa|model name|^cpu max mhz|^cpu mhz" ; nvidia-smi topo -m 2>&1 | head -4
n=$(nproc); half=$((n / 2))
T0=$(date +%s)
for i in $(seq ${PAIRS:-2}); do
  for pin in none "0-$((half - 1))" "$half-$((n - 1))"; do
    [ $(( $(date +%s) - T0 )) -gt ${BUDGET:-300} ] && break 2
    pre=""; [ "$pin" != none ] && pre="taskset -c $pin"
    repo=$PWD; f="$OUT/thr_${pin}_$i"
    (cd /tmp/thr_wd && PYTHONPATH=$repo timeout 150 $pre python3 "$repo/benchmarks/thr_spread.py" "$f" --runs 1 --no-smi \
      --model $MODEL > "$f.txt" 2>&1)
    echo "pin=$pin run $i rc=$? $(( $(date +%s) - T0 )) s: $(grep -o '"out_tok_s": [0-9.]*\|"decode_span_s": [0-9.]*\|"host_wait_s": [0-9.]*\|"host_wait_ms_median": [0-9.]*\|"0": \[[0-9, .]*\]' "$f.txt" | tr '\n' ' ')"
    rm -rf "$f"
  done
done
