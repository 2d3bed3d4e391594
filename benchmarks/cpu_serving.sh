#!/usr/bin/env bash
# One `pagedserve serve` (the embedded default model, its CPU defaults) under `pagedserve bench serve`: N prompts
# of 200-1,000 tokens (random dataset, input 600, range ratio 0.66), OUT tokens out, at RATE requests/s; so most steps
# mix new prompts' chunks with running streams' decodes. TTFT / TPOT / ITL / E2E to stdout and RESULT_JSON.
# Usage: bash benchmarks/cpu_serving.sh [CODE_DIR] [RESULT_JSON]
# (CODE_DIR: a checkout whose pagedserve/ is served, default this one; e.g. a `git worktree` of an older commit)
set -euo pipefail
CODE=${1:-$PWD}; RESULT=${2:-/tmp/cpu_serving.json}
PY=${PY:-$PWD/.venv/bin/python}; PORT=${PORT:-8391}
N=${N:-32}; OUT=${OUT:-64}; RATE=${RATE:-1}
source "$(dirname "$0")/cpu_server.sh"
start_server "$CODE" "$PORT"
PYTHONPATH=$PWD "$PY" -c "from pagedserve.cli import main; main()" bench serve --port "$PORT" \
  --dataset-name random --ignore-eos --disable-tqdm --num-prompts "$N" --random-input-len 600 \
  --random-range-ratio 0.66 --random-output-len "$OUT" --request-rate "$RATE" --seed 3 --save-result \
  --result-filename "$RESULT" --metric-percentiles 50,90,99 > "$RESULT.txt" 2>&1
echo "== code: $CODE ($(git -C "$CODE" log --oneline -1)), $(date -u +%FT%TZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
grep -E "Successful|Benchmark duration|throughput|TTFT|TPOT|ITL|E2E" "$RESULT.txt"
