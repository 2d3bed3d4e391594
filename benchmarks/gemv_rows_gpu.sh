#!/usr/bin/env bash
# Issue 22, decode steps of 2-64 rows on nvidia-h200 (one call, ~4-5 min, nothing to carry):
# the GPU gemv kernel tests, benchmarks/gemv_sweep.py (2-64 rows x llama-1b / 8b shapes, cuBLAS
# against the gemv's launches; its table), then benchmarks/gemv_rows_gpu.py (engines A/B: rows16,
# gemv64 with the table, attn64). Results under $OUT. With --thr512 (E2E_ARGS) carry .devcarry/peers.py:
# thr512 is then peers.py's own workload.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/console.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader; date -u
git log --oneline -1 2>/dev/null
t0=$SECONDS
timeout 120 python3 -m pytest -q -x tests/kernels/test_gemv.py 2>&1 | tail -3
echo "tests $((SECONDS - t0)) s"
timeout 300 python3 benchmarks/gemv_sweep.py "$OUT/gemv_sweep.json" ${SWEEP_ARGS:-} 2> "$OUT/sweep_stderr.txt"
echo "sweep done at $SECONDS s"
TABLE=$OUT/gemv_sweep.json; [ -f "$TABLE" ] || TABLE=""
timeout $((590 - SECONDS)) python3 benchmarks/gemv_rows_gpu.py "$OUT" ${TABLE:+--table $TABLE} ${E2E_ARGS:-}
echo "exit $? after $SECONDS s"
