#!/usr/bin/env bash
# Session 54, call 3: online serving with a shared 2,048-token system prompt, cascade attention on / off
# (--disable-cascade-attn), llama-8b dummy weights + the Llama-3 tokenizer, max_model_len 4096, engine process:
#   benchmarks/serve_gpu.sh --skip-startup --engines pagedserve --variants process,process-nocascade
#     --rates 16,32,inf --num-prompts 300 --prefix-len 2048       -> $OUT/serve_gpu.{json,md}, console.txt, logs
# Carry .devcarry (serve/ from benchmarks/serve_gpu_prepare.sh).
set -uo pipefail
export MAX_LEN=4096
bash benchmarks/serve_gpu.sh --skip-startup --engines pagedserve --variants ${VARIANTS:-process,process-nocascade} \
  --rates ${RATES:-16,32,inf} --num-prompts ${NUM:-300} --prefix-len 2048
