#!/usr/bin/env bash
# LoRA adapters on a GPU (layers/lora.py): the LoRA tests with CUDA graphs on, then the speed of a
# rank-16 adapter on every projection of llama-1b / llama-8b (dummy weights, peers.py's configs)
# against the base model, with graphs and eager: `pagedserve bench latency` (batch 1) and
# `bench throughput` (peers' 512-request workload, --max-loras 4 ids of one adapter).
# (`python3 -m pagedserve.bench.cli`: the GPU image has no server stack, which `pagedserve bench` imports.)
#   [LORA_THR=0] bash benchmarks/lora_gpu.sh [tests] [MODEL...]     (carry .devcarry/peers.py)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$SECONDS
if [ "${1:-}" = tests ]; then
  shift
  PAGEDSERVE_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider tests/models/test_lora.py \
    -k "not parallel" 2>&1 | tee "$OUT/tests.txt" | tail -4
fi
for model in "$@"; do
  dir=$(python3 -c "import sys; sys.path.insert(0, '.devcarry'); import peers; print(peers.make_model_dir('$model'))")
  python3 benchmarks/lora_make.py "$dir" "/tmp/lora-$model" 16
  common=(--model "$dir" --load-format dummy --skip-tokenizer-init --dtype bfloat16 --max-model-len 4096 --disable-tqdm)
  for mode in base lora lora-eager; do
    extra=()
    [ "$mode" != base ] && extra=(--lora-path "/tmp/lora-$model" --max-loras 4)
    [ "$mode" = lora-eager ] && extra+=(--enforce-eager)
    timeout 200 python3 -m pagedserve.bench.cli latency "${common[@]}" "${extra[@]}" --batch-size 1 --input-len 128 \
      --output-len 256 --num-iters 3 --result-filename "$OUT/lat-$model-$mode.json" > "$OUT/lat-$model-$mode.log" 2>&1
    echo "b1 $model $mode rc=$? $(grep -i 'tok/s\|tokens/s' "$OUT/lat-$model-$mode.log" | tail -1)"
    [ "$mode" = lora-eager ] || [ "${LORA_THR:-1}" = 0 ] && continue   # LORA_THR=0: batch-1 latency only
    timeout 300 python3 -m pagedserve.bench.cli throughput "${common[@]}" "${extra[@]}" --dataset-name peers \
      --num-prompts 512 --result-filename "$OUT/thr-$model-$mode.json" > "$OUT/thr-$model-$mode.log" 2>&1
    echo "thr512 $model $mode rc=$? $(grep 'pagedserve continuous' "$OUT/thr-$model-$mode.log")"
  done
done
echo "done in $((SECONDS - START)) s"
