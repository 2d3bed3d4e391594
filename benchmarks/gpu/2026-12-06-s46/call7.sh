set -uo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
timeout 300 python3 benchmarks/penalty_mix.py --model llama-1b --rounds 2 --kinds base,sampled,sampled_k,min_p --profile sampled \
  > "$OUT/call7_mix.txt" 2>&1
grep -E "RESULT|Error" "$OUT/call7_mix.txt"
