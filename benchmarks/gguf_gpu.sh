#!/usr/bin/env bash
# Issue 19's GPU part (ggufgpu, ggk) in one device call (<= 240 s): triton_gguf's kernel tests on
# the GPU, then benchmarks/gguf_gpu.py: (--default-model) the default model (its first 4 layers:
# .devcarry/gguf_model, made by `python benchmarks/gguf_gpu.py prepare`) packed against dequantized
# on CUDA, bf16: greedy ids against fp32's, b1_decode, the 64-prompt batch, weight bytes; (default)
# the GEMV's launch tuning per type and random models of the new types. Raw under $OUT.
#   bash benchmarks/gguf_gpu.sh               (session 10, no carry: every type's tests, tuning, random
#                                             models' b1_decode; see the else branch)
#   bash benchmarks/gguf_gpu.sh --default-model   (session 9's: carry .devcarry/gguf_model, ~40 MB)
#   bash benchmarks/gguf_gpu.sh --confirm     (session 10's second call: the tuned launches end to end;
#                                             carry .devcarry/gguf_model)
#   bash benchmarks/gguf_gpu.sh --cpu-smoke   (here: the script on the CPU, Triton's interpreter)
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
SMOKE=${1:-}
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null; date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/machine.txt"
echo "=== kernel tests"
if [ "$SMOKE" = "--cpu-smoke" ]; then
  TRITON_INTERPRET=1 timeout 300 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_gguf_triton.py -k "gemv_default or route" 2>&1 | tail -3 | tee "$OUT/tests.txt"
  echo "=== model"
  timeout 1500 $PY benchmarks/gguf_gpu.py run --cpu-smoke --timeout 120 2>&1 | tee "$OUT/gguf_gpu.txt" | grep --line-buffered -v "^INFO"
elif [ "$SMOKE" = "--default-model" ]; then
  # session 9's run: the default model's 4-layer cut (carry .devcarry/gguf_model)
  PAGEDSERVE_TEST_DEVICE=cuda timeout 75 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_gguf_triton.py \
    -k "Q4_1 or Q8_0" > "$OUT/tests.txt" 2>&1; tail -n 3 "$OUT/tests.txt"
  echo "=== model"
  timeout 155 $PY benchmarks/gguf_gpu.py run --timeout 50 2>&1 | tee "$OUT/gguf_gpu.txt" | grep --line-buffered -v "^INFO"
elif [ "$SMOKE" = "--confirm" ]; then
  # session 10's second call: triton_gguf.CONFIGS (tuned) end to end against the untuned launches
  # (packed0) and the dequantized path: the default model's 4-layer cut (carry .devcarry/gguf_model),
  # then the random models of the new types while time is left
  TYPES=${TYPES:-Q4_K,Q6_K,Q5_K,Q5_0,Q5_1}
  $PY benchmarks/gguf_gpu.py random --warm --types "$TYPES" > "$OUT/random_write.txt" 2>&1 &
  echo "=== default model's cut: dequant, packed (the default: small layers), packedall (every layer)"
  timeout 100 $PY benchmarks/gguf_gpu.py run --variants ${CUT_VARIANTS:-dequant,packed,packedall} --timeout 32 2>&1 | tee "$OUT/gguf_gpu.txt" \
    | grep --line-buffered -v "^INFO"
  wait
  LEFT=$((228 - SECONDS))
  echo "=== random models, b1_decode dequant / packed / packed0 (t=${SECONDS}s, ${LEFT}s left)"
  timeout "$LEFT" $PY benchmarks/gguf_gpu.py random --types "$TYPES" --variants dequant,packed,packed0 --timeout 35 \
    --budget "$((LEFT - 3))" 2>&1 | tee "$OUT/random.txt" | grep --line-buffered -v "^INFO"
  echo "=== done (t=${SECONDS}s)"
else
  # session 10 (ggk), no carry, <= 8 files under $OUT: every type's kernel tests, a process per type
  # (the compiles are CPU-bound; the Triton cache is shared safely), each then compiling the tuning
  # grid; the random models written meanwhile; then the timed tuning (gguf_tune.json); then
  # b1_decode of a random 1B-class 4-layer model per type, dequant vs packed with the tune's best
  # launches (GGUF_TUNED), in RANDOM_TYPES' order while time is left (~195 s in all)
  TYPES="Q4_K Q4_1 Q6_K Q5_K Q5_0 Q5_1 Q8_0 Q4_0"
  LOGS=/tmp/ggk_logs; mkdir -p "$LOGS"
  $PY benchmarks/gguf_gpu.py random --warm --types "${TYPES// /,}" > "$LOGS/random_write.txt" 2>&1 &
  for t in $TYPES; do
    ( PAGEDSERVE_TEST_DEVICE=cuda timeout 60 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_gguf_triton.py \
        -k "$t" > "$LOGS/tests_$t.txt" 2>&1
      timeout 55 $PY benchmarks/gguf_gpu.py tune --types "$t" --warm > "$LOGS/warm_$t.txt" 2>&1 ) &
  done
  PAGEDSERVE_TEST_DEVICE=cuda timeout 60 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_gguf_triton.py \
    -k "not (${TYPES// / or })" > "$LOGS/tests_rest.txt" 2>&1
  wait
  { for f in "$LOGS"/tests_*.txt; do echo "$(basename "$f" .txt): $(tail -n 1 "$f")"; done
    echo "--- failures"; grep -h -A40 "^_____" "$LOGS"/tests_*.txt | head -400
    echo "--- warm-up errors"; grep -h "TUNE.*Error\|Traceback\|Error:" "$LOGS"/warm_*.txt | head -50
    echo "--- random models"; tail -n 3 "$LOGS/random_write.txt"; } > "$OUT/tests.txt"
  head -n 12 "$OUT/tests.txt"
  echo "=== tune (t=${SECONDS}s)"
  timeout 70 $PY benchmarks/gguf_gpu.py tune --types "${TYPES// /,}" 2>&1 | tee "$OUT/tune.txt" | grep --line-buffered "^TUNE\|Error"
  LEFT=$((195 - SECONDS))
  echo "=== random models, b1_decode dequant vs packed (tuned) (t=${SECONDS}s, ${LEFT}s left)"
  GGUF_TUNED="$OUT/gguf_tune.json" timeout "$LEFT" $PY benchmarks/gguf_gpu.py random --types "${TYPES// /,}" \
    --timeout 30 --budget "$((LEFT - 3))" 2>&1 | tee "$OUT/random.txt" | grep --line-buffered -v "^INFO"
  echo "=== done (t=${SECONDS}s)"
fi
