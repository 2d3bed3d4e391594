#!/usr/bin/env bash
# Session 55, call 4 (after four staging calls: `mkdir -p /tmp/peer && cp .peer/sN/* /tmp/peer/`, carrying
# .peer/sN from benchmarks/vllm_restage.sh): vLLM 0.24 on call 3's shapes (4 system prompts of 2,048 tokens, the
# prefix_repetition dataset, rates 32 and inf, 300 requests each), the same client, on the same machine:
#   benchmarks/serve_gpu.sh --skip-startup --engines vllm --rates 32,inf --num-prompts 300 --prefix-len 2048
#     --num-prefixes 4                                                   -> $OUT/serve_gpu.{json,md}, logs
# Carry .peer/d .peer/e .devcarry/serve.
set -uo pipefail
export MAX_LEN=4096
bash benchmarks/serve_gpu.sh --skip-startup --engines ${ENGINES:-vllm} --rates ${RATES:-32,inf} \
  --num-prompts ${NUM:-300} --prefix-len 2048 --num-prefixes ${PREFIXES:-4}
