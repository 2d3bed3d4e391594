#!/usr/bin/env bash
# Issue 22, FlashAttention-4 for long prefill chunks (pagedserve/attention/fa4_prefill.py) on nvidia-h200.
# flash-attn-4 and its CuTe DSL wheels (~99 MB; the image has cuda-bindings, protobuf and einops) travel in three
# pieces, one a call (carry .devcarry/fK), made by `bash benchmarks/fa4_pack.sh`.
#   bash benchmarks/fa4_probe_gpu.sh K [MODE...]   copies piece K (- for none); once all three are there,
#   installs into /tmp/fa4_site; then each MODE:
#     run    benchmarks/fa4_probe.py (FA4 against torch's cuDNN op, the kernels alone)
#     tests  the FA4 / cuDNN / prefill kernel tests on the GPU with FA4 installed
#     ab     peers_long.py llama-8b without FA4 (A) and with it (B), A B A B, one process each
#            (carry .devcarry/peers.py .devcarry/peers_long.py .devcarry/cfe: cuDNN's frontend in both)
#     a / b  one peers_long.py process of A / of B (`a b p8 a b`: as many as LIMIT allows)
#     p8     peers.py llama-8b with FA4 installed (start-up; thr512's prompts never start its compile)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/fa4_stage
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
FA4=/tmp/fa4_site:/tmp/fa4_site/nvidia_cutlass_dsl/dsl_packages
START=$SECONDS
left() { echo $(( ${LIMIT:-570} - (SECONDS - START) )); }
piece=${1:--}; shift || true
na=0 nb=0
[ "$piece" != - ] && cp .devcarry/f"$piece"/piece.* /tmp/fa4_stage/ && echo "STAGED $(ls /tmp/fa4_stage | tr '\n' ' ')"
if [ ! -d /tmp/fa4_site/flash_attn ] && [ "$(ls /tmp/fa4_stage | wc -l)" = 3 ]; then
  mkdir -p /tmp/fa4_unp && cat /tmp/fa4_stage/piece.* | tar x -C /tmp/fa4_unp \
    && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fa4_site /tmp/fa4_unp/fa4w/*.whl \
    && echo "flash-attn-4 installed" || echo "install failed"
fi
[ -d .devcarry/cfe ] && python3 -m pip install -q --no-deps --upgrade --target /tmp/cfe_site .devcarry/cfe/*.whl 2>&1 | grep -v WARN
long() {   # label, pythonpath
  if [ "$(left)" -lt 80 ]; then echo "SKIP $1 (time)" | tee -a "$OUT/summary.txt"; return; fi
  PYTHONPATH=$2 timeout "$(left)" python3 .devcarry/peers_long.py pagedserve llama-8b > "$OUT/long-$1.log" 2>&1
  echo "rc=$? $1" | tee -a "$OUT/summary.txt"
  grep -h "FlashAttention-4\|RESULT" "$OUT/long-$1.log" | cut -c1-250 | tee -a "$OUT/summary.txt"
}
for mode in "$@"; do
  case $mode in
    run) PYTHONPATH=$PWD:$FA4 timeout 400 python3 benchmarks/fa4_probe.py 2>&1 | tee "$OUT/fa4_probe.txt" \
           | grep -E "RESULT|Error|error" | cut -c1-400 ;;
    tests) PYTHONPATH=$PWD:$FA4:/tmp/cfe_site PAGEDSERVE_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider \
             tests/kernels/test_fa4_prefill.py tests/kernels/test_cudnn_prefill.py 2>&1 | tee "$OUT/tests.txt" | tail -15 ;;
    ab) for i in 1 2; do long "A$i" "$PWD:/tmp/cfe_site"; long "B$i" "$PWD:/tmp/cfe_site:$FA4"; done ;;
    a) long "A$((++na))" "$PWD:/tmp/cfe_site" ;;
    b) long "B$((++nb))" "$PWD:/tmp/cfe_site:$FA4" ;;
    p8) [ "$(left)" -lt 45 ] && { echo "SKIP p8 (time)"; continue; }
        PYTHONPATH=$PWD:/tmp/cfe_site:$FA4 timeout 200 python3 .devcarry/peers.py pagedserve llama-8b 2>&1 \
          | tee "$OUT/p8.txt" | grep -E "RESULT|FlashAttention-4" | cut -c1-250 ;;
    *) echo "unknown mode $mode" ;;
  esac
done
echo "done in $((SECONDS - START)) s"
