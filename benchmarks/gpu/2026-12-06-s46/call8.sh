set -uo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_nucleus.py 2>&1 | tail -1 | tee "$OUT/call8.txt"
TILES=8192x16 timeout 100 python3 benchmarks/sampler_sweep.py 128 512 2>&1 | grep -E "RESULT|Error" | tee -a "$OUT/call8.txt"
for tree in .devcarry/main . .devcarry/main .; do
  TREE=$tree SETTINGS=top_p,top_k_top_p PARTS=0 timeout 150 python3 benchmarks/sampler_gpu.py 512 \
    2>&1 | grep -E "RESULT|Error" | grep -v '"kernel": false' | tee -a "$OUT/call8.txt"
done
timeout 200 python3 benchmarks/penalty_mix.py --model llama-1b --rounds 2 --kinds base,sampled,sampled_k 2>&1 \
  | grep -E "RESULT|Error" | tee -a "$OUT/call8.txt"
