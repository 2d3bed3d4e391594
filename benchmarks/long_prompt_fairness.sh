#!/usr/bin/env bash
# Short requests beside long prompts on one `pagedserve serve` (the embedded default model): one client sends
# LONG_N prompts of LONG_LEN tokens one after another (8 tokens out each), another sends SHORT_N short streams
# (32 tokens in, 32 out) at SHORT_RATE requests/s; the short client's TTFT / ITL / E2E are what a long prompt
# costs the requests around it. Both clients are `pagedserve bench serve`.
# Usage: [SERVER_ARGS="--max-num-batched-tokens 512"] bash benchmarks/long_prompt_fairness.sh [CODE_DIR] [RESULT_JSON]
# (CODE_DIR: a checkout whose pagedserve/ is served, default this one; e.g. a `git worktree` of an older commit
# for an A/B)
set -euo pipefail
CODE=${1:-$PWD}; RESULT=${2:-/tmp/long_prompt_fairness.json}
PY=${PY:-$PWD/.venv/bin/python}; PORT=${PORT:-8390}
LONG_N=${LONG_N:-3}; LONG_LEN=${LONG_LEN:-7800}; SHORT_N=${SHORT_N:-24}; SHORT_RATE=${SHORT_RATE:-0.4}
source "$(dirname "$0")/cpu_server.sh"
start_server "$CODE" "$PORT"
bench() { PYTHONPATH=$PWD "$PY" -c "from pagedserve.cli import main; main()" bench serve --port "$PORT" \
  --dataset-name random --ignore-eos --disable-tqdm --skip-initial-test "$@"; }
bench --num-prompts "$LONG_N" --random-input-len "$LONG_LEN" --random-output-len 8 --random-range-ratio 0 \
  --max-concurrency 1 --request-rate inf --seed 1 > "$RESULT.long.txt" 2>&1 &
LONGC=$!
sleep 2
bench --num-prompts "$SHORT_N" --random-input-len 32 --random-output-len 32 --random-range-ratio 0 \
  --request-rate "$SHORT_RATE" --seed 2 --save-result --save-detailed --result-filename "$RESULT" --metric-percentiles 50,90,99 \
  > "$RESULT.short.txt" 2>&1
wait $LONGC
echo "== code: $CODE ($(git -C "$CODE" log --oneline -1)), $(date -u +%FT%TZ), $(nproc) CPUs, server: ${SERVER_ARGS:-}"
echo "== long client"; grep -E "Successful|Benchmark duration|Mean TTFT|Median TTFT" "$RESULT.long.txt"
echo "== short client"; grep -E "Successful|TTFT|ITL|E2E" "$RESULT.short.txt"
