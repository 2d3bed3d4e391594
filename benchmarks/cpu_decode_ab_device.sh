#!/bin/bash
# Issue 19 (cpu19e): quiet 1 -> 2 thread scaling of batch-1 CPU decode, main's package
# (.devcarry/main, git archive of main) against this checkout's, in turns, pinned to 2 idle
# cores of the GPU host (no GPU used). .devcarry/model: the default model's config.json and
# gguf_quant.json (dummy weights). Prints RESULT lines and a SUMMARY; raw JSON under $OUT.
set -u
export CUDA_VISIBLE_DEVICES= PYTHONUNBUFFERED=1
lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-200
python3 -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())"
timeout 280 python3 benchmarks/cpu_decode_ab.py --model .devcarry/model --checkout main=.devcarry/main \
  --checkout branch=. --cores 2,3 --rounds 3 --steps 64 --out "${OUT:-/tmp/cpu_decode_ab}"
