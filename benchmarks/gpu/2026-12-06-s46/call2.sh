set -uo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
timeout 120 python3 benchmarks/sampler_sweep.py 128 512 2>&1 | grep -E "RESULT|Error" | tee "$OUT/sweep.txt"
for tree in .devcarry/main . .devcarry/main .; do
  TREE=$tree timeout 130 python3 benchmarks/penalty_mix.py --model llama-8b --rounds 1 --kinds base,sampled,sampled_k \
    2>&1 | grep -E "RESULT|Error|error" | tee -a "$OUT/sampler8b.txt"
done
