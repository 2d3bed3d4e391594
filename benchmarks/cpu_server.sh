# Sourced by the CPU serving scripts (long_prompt_fairness.sh, cpu_serving.sh). start_server CODE PORT: `pagedserve
# serve` (with $SERVER_ARGS, run by $PY) from CODE's pagedserve/, started from CODE itself (`python -c` puts the
# working directory first on the path), waited for on /health; $SERVER is its pid, stopped when the script exits.
start_server() {
  local code=$1 port=$2 log
  log=$(mktemp)
  (cd "$code" && exec env PYTHONPATH="$code" "$PY" -c "from pagedserve.cli import main; main()" serve --port "$port" \
    ${SERVER_ARGS:-}) > "$log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
  sleep 1; echo "== server from $(readlink "/proc/$SERVER/cwd"), log $log"
  for _ in $(seq 120); do curl -sf "localhost:$port/health" >/dev/null && break; sleep 1; done
}
