#!/usr/bin/env bash
# Issue 20 on nvidia-h200 in one call (60 s on 2026-12-01; the timeouts bound it at 380 s): the grammar
# fill, overlap and accept microbenchmark without a model, then the 64-request JSON-schema overhead
# on a llama-1b and a llama-8b shape (random weights, the default model's tokenizer:
# .devcarry/smolbench and .devcarry/smolbench8b), each schema run in two variants (batch: the
# engine as is; rows: the fill row by row) against the plain run, in turns. Needs xgrammar and
# its py3.12 deps carried in .whl/.
set -uo pipefail
export PYTHONPATH=$PWD:/tmp/xgsite PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import xgrammar" 2>/dev/null || python3 -m pip install -q --no-deps --target /tmp/xgsite .whl/*.whl 2>&1 | grep -v WARNING | tail -2
python3 -c "import xgrammar; print('xgrammar', xgrammar.__file__)" || exit 1
python3 -c "import jsonschema" 2>/dev/null || echo "jsonschema not installed: schema validity not checked (json.loads only)"
nproc | tee "$OUT/machine.txt"; nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$OUT/machine.txt"
git log -1 --format='%h %s' | tee -a "$OUT/machine.txt"; date -u | tee -a "$OUT/machine.txt"
SHAPES=${SHAPES:-fill 1b 8b}   # e.g. SHAPES=1b: the llama-1b shape only (~35 s)
if [[ " $SHAPES " == *" fill "* ]]; then
  timeout 60 python3 benchmarks/grammar_fill.py --tokenizer .devcarry/smolbench --threads ${THREADS:-2,4,8} 2>&1 \
    | tee "$OUT/grammar_fill.txt" | grep -E "RESULT|Error"
fi
if [[ " $SHAPES " == *" 1b "* ]]; then
  timeout 150 python3 benchmarks/structured_overhead.py --device cuda --dtype bfloat16 --model .devcarry/smolbench \
    --load-format dummy --repeats 5 --profile 2>&1 | tee "$OUT/overhead_1b.txt" | grep -E "RESULT|Error|overhead"
fi
if [[ " $SHAPES " == *" 8b "* ]]; then
  timeout 170 python3 benchmarks/structured_overhead.py --device cuda --dtype bfloat16 --model .devcarry/smolbench8b \
    --load-format dummy --repeats 3 2>&1 | tee "$OUT/overhead_8b.txt" | grep -E "RESULT|Error|overhead"
fi
