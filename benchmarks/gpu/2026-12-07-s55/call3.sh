#!/usr/bin/env bash
# Session 55, call 3: online serving with 4 system prompts of 2,048 tokens (the prefix_repetition dataset: 544
# tokens of each prompt's own, 264 out), cascade attention on (every group a step) / off (--disable-cascade-attn),
# llama-8b dummy weights + the Llama-3 tokenizer, max_model_len 4096, engine process:
#   benchmarks/serve_gpu.sh --skip-startup --engines pagedserve --variants process,process-nocascade
#     --rates 32,inf --num-prompts 300 --prefix-len 2048 --num-prefixes 4   -> $OUT/serve_gpu.{json,md}, logs
# Carry .devcarry (serve/ from benchmarks/serve_gpu_prepare.sh).
set -uo pipefail
export MAX_LEN=4096
bash benchmarks/serve_gpu.sh --skip-startup --engines pagedserve --variants ${VARIANTS:-process,process-nocascade} \
  --rates ${RATES:-32,inf} --num-prompts ${NUM:-300} --prefix-len 2048 --num-prefixes ${PREFIXES:-4}
