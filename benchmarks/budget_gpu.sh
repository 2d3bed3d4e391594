#!/usr/bin/env bash
# Issue 22: the offline engine's token budget a step (max_num_batched_tokens) at vLLM's LLM-class
# default on 70 GiB+ GPUs (16384) against ours (8192), on the peers' own workloads, one engine per
# process, the two interleaved. nvidia-h200; carry .devcarry/peers.py, .devcarry/peers_long.py and
# .devcarry/cfe (benchmarks/stage_devcarry.sh; cp ../shared/bench/peers_long.py .devcarry/).
#   bash benchmarks/budget_gpu.sh thr    thr_spread.py on llama-1b (4 pairs) and llama-8b (2 pairs), ~3.6 min
#   bash benchmarks/budget_gpu.sh long   peers_long.py on llama-8b through peers_with.py (2 pairs), ~3 min
# A = BUDGET_A (8192), B = BUDGET_B (16384), both given explicitly (the library's default is one of
# them). $OUT/summary.txt: one line a process. `bash benchmarks/budget_gpu.sh both`: thr then long.
set -uo pipefail
export PYTHONPATH=$PWD:/tmp/cfe_site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
A=${BUDGET_A:-8192} B=${BUDGET_B:-16384}
REPO=$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  git -C "$REPO" log --oneline -1 2>/dev/null || true
  date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/machine.txt"
START=$SECONDS
left() { echo $(( ${LIMIT:-570} - (SECONDS - START) )); }

thr() {   # model, label, extra args
  local model=$1 label=$2; shift 2
  if [ "$(left)" -lt 60 ]; then echo "SKIP $model $label (time)"; return; fi
  mkdir -p /tmp/w && cd /tmp/w && ln -sfn "$REPO/.devcarry" .devcarry
  timeout "$(left)" python3 "$REPO/benchmarks/thr_spread.py" "/tmp/w/$model-$label" --runs 1 --no-smi --model "$model" "$@" \
      > "$OUT/thr-$model-$label.log" 2>&1
  echo "rc=$? $model $label $(grep -o '"steps": [0-9]*\|"out_tok_s": [0-9.]*\|"wall_s": [0-9.]*\|"decode_span_s": [0-9.]*\|"host_wait_ms_median": [0-9.]*\|"ready_s": [0-9.]*' \
      "$OUT/thr-$model-$label.log" | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
  cd "$REPO"
}

long() {   # label, kwargs...
  local label=$1; shift
  if [ "$(left)" -lt 100 ]; then echo "SKIP long $label (time)"; return; fi
  timeout "$(left)" python3 benchmarks/peers_with.py "$@" -- .devcarry/peers_long.py pagedserve llama-8b \
      > "$OUT/long-$label.log" 2>&1
  echo "rc=$? long $label" | tee -a "$OUT/summary.txt"
  grep -h "peak forward" "$OUT/long-$label.log" | tail -1 | cut -c1-160 | tee -a "$OUT/summary.txt"
  grep RESULT "$OUT/long-$label.log" | cut -c1-300 | tee -a "$OUT/summary.txt"
}

case "${1:-thr}" in
  thr|both)
    for i in 1 2 3 4; do thr llama-1b "A$i" --mbt "$A"; thr llama-1b "B$i" --mbt "$B"; done
    for i in 1 2; do thr llama-8b "A$i" --mbt "$A"; thr llama-8b "B$i" --mbt "$B"; done ;;&
  long|both)
    python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/nvidia_cudnn_frontend-*.whl 2>&1 | tail -2
    for i in 1 2; do long "A$i" "max_num_batched_tokens=$A"; long "B$i" "max_num_batched_tokens=$B"; done ;;
esac
echo "done in $((SECONDS - START)) s"
