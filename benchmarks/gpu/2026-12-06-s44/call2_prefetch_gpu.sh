#!/usr/bin/env bash
# Session 44's second device call: the decode launch's block-table prefetch into the L1
# (triton_paged_attention.DECODE_PREFETCH_TABLE) A/B'd on the kernel alone (attn_ncu.py --ab, bf16 and
# FP8 caches, 256 / 448 rows) and on thr512 llama-8b (penalty_mix.py --kinds base, PREFETCH=0 / 1,
# alternating processes); then penalties on a warm engine (rounds 2: the first round's base fills the
# prefix cache). Carry .devcarry (peers.py; the old tree in .devcarry/main). Figures in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader | tee "$OUT/prefetch.txt"
for rows in 448 256; do
  for kv in "" --fp8; do
    (cd benchmarks && timeout 60 python3 attn_ncu.py --rows $rows $kv --ab DECODE_PREFETCH_TABLE 2>&1 | grep "A/B") | tee -a "$OUT/prefetch.txt"
  done
done
run() { timeout "$1" env TREE="$2" PREFETCH="$3" python3 benchmarks/penalty_mix.py --model "$4" --rounds "$5" --kinds "$6" 2>&1 \
  | grep -E "RESULT|Error|error" | tee -a "$OUT/$7"; }
run 60 . 0 llama-8b 1 base prefetch.txt
run 60 . 1 llama-8b 1 base prefetch.txt
run 60 . 0 llama-8b 1 base prefetch.txt
run 60 . 1 llama-8b 1 base prefetch.txt
run 70 . 1 llama-1b 2 base,one,all pen2.txt
run 70 .devcarry/main 1 llama-1b 2 base,one pen2.txt
