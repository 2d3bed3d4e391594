#!/usr/bin/env bash
# Issue 20 on nvidia-h200 in one call (~2.5 min): the grammar fill variants without a model, then
# the 64-request JSON-schema overhead on a llama-1b and a llama-8b shape (random weights, the
# default model's tokenizer: .devcarry/smolbench and .devcarry/smolbench8b), PAGEDSERVE_GRAMMAR_THREADS
# one process each. Needs xgrammar and its py3.12 deps carried in .whl/.
set -uo pipefail
export PYTHONPATH=$PWD:/tmp/xgsite PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import xgrammar" 2>/dev/null || python3 -m pip install -q --no-deps --target /tmp/xgsite .whl/*.whl 2>&1 | grep -v WARNING | tail -2
python3 -c "import xgrammar; print('xgrammar', xgrammar.__file__)" || exit 1
nproc | tee "$OUT/machine.txt"; nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$OUT/machine.txt"
timeout 60 python3 benchmarks/grammar_fill.py --tokenizer .devcarry/smolbench --threads ${THREADS:-1,2,4,8} 2>&1 | tee "$OUT/grammar_fill.txt" | grep -E "RESULT|Error"
timeout 150 python3 benchmarks/structured_overhead.py --device cuda --dtype bfloat16 --model .devcarry/smolbench \
  --load-format dummy --repeats 3 2>&1 | tee "$OUT/overhead_1b.txt" | grep -E "RESULT|Error"
timeout 200 python3 benchmarks/structured_overhead.py --device cuda --dtype bfloat16 --model .devcarry/smolbench8b \
  --load-format dummy --repeats 2 2>&1 | tee "$OUT/overhead_8b.txt" | grep -E "RESULT|Error"
