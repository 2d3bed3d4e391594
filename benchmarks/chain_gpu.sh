#!/usr/bin/env bash
# Issue 22, session 25: the one-row norm chain (each residual add + RMSNorm in the gemvs around it:
# triton_gemv's add_gemv / rms_norm_gemv, models/llama.py's forward_chained) and the norm kernel's
# fp64 sum of squares, on nvidia-h200 in three calls on one warm machine (the default GGUF travels
# in three parts, benchmarks/stage_devcarry.sh; a machine taken back between calls loses them):
#   a  carry .devcarry/gg1 .devcarry/before .devcarry/peers.py (before: `git archive COMMIT pagedserve
#      | tar -x -C .devcarry/before`): the gemv / norm kernel tests and the model test on the GPU,
#      then ab_gpu.sh's models step (b1_decode, replay, kernel table; llama-8b and llama-1b) twice
#      each way, alternating (~5 min)
#   b  carry .devcarry/gg2: ab_gpu.sh's models step once more each way (~1.5 min)
#   c  carry .devcarry/gg3: bf16_agreement.py (the default model: the norm kernel's fp64 sum) with
#      this tree, then with the tree of `a`'s .devcarry/before; the default model's GPU test (~4 min)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PAGEDSERVE_TEST_DEVICE=cuda
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for part in .devcarry/gg*/part_a?; do [ -f "$part" ] && cp "$part" /tmp/ && echo "STAGED $(basename "$part")"; done
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/machine.txt"
case "${1:-}" in
a)
  rm -rf /tmp/before && cp -r .devcarry/before /tmp/before
  PYTHONPATH=$PWD timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_gemv.py \
      tests/kernels/test_fused_ops.py tests/models/test_norm_chain.py > "$OUT/tests.txt" 2>&1
  echo "TESTS rc=$? $(tail -1 "$OUT/tests.txt")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20
  STEPS=models PAIRS=2 OUT=$OUT BUDGET=500 bash benchmarks/ab_gpu.sh
  ;;
b)
  [ -d .devcarry/before/pagedserve ] || { mkdir -p .devcarry && cp -r /tmp/before .devcarry/before; }
  STEPS=models PAIRS=1 OUT=$OUT bash benchmarks/ab_gpu.sh
  ;;
c)
  bash benchmarks/gguf_join.sh "$OUT" || exit 1
  PYTHONPATH=$PWD:/tmp/site timeout 240 python3 benchmarks/bf16_agreement.py "$OUT/bf16_now.json" cuda 2>&1 \
      | tee "$OUT/bf16_now.txt" | grep -E "identical|RESULT|Error"
  (cd /tmp && PYTHONPATH=/tmp/before:/tmp/site:$OLDPWD timeout 240 python3 $OLDPWD/benchmarks/bf16_agreement.py \
      "$OUT/bf16_before.json" cuda 2>&1 | tee "$OUT/bf16_before.txt" | grep -E "identical|RESULT|Error")
  PYTHONPATH=$PWD:/tmp/site timeout 150 python3 -m pytest -q -p no:cacheprovider tests/models/test_default_model.py \
      > "$OUT/default_model.txt" 2>&1
  echo "DEFAULT_MODEL rc=$? $(tail -1 "$OUT/default_model.txt")"
  ;;
*) echo "usage: chain_gpu.sh a|b|c"; exit 2 ;;
esac
