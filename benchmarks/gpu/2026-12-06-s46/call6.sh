set -uo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_nucleus.py 2>&1 | tail -1 | tee "$OUT/call6.txt"
for tree in .devcarry/main . .devcarry/main .; do
  TREE=$tree TILES=4096x16,2048x8,8192x16 timeout 100 python3 benchmarks/sampler_sweep.py 128 512 2>&1 | grep -E "RESULT|Error" | tee -a "$OUT/call6.txt"
done
for tree in .devcarry/main .; do
  TREE=$tree SETTINGS=temperature,top_p,top_k_top_p,min_p PARTS=0 timeout 150 python3 benchmarks/sampler_gpu.py 128 512 \
    2>&1 | grep -E "RESULT|Error" | grep -v '"kernel": false' | tee -a "$OUT/call6.txt"
done
