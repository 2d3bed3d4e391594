#!/usr/bin/env bash
# Issue 24 on nvidia-h200-x4 (NVLink multicast off, as KINDS.md asks): the seed's 70B deployment on four
# GPUs, llama-70b dummy weights (tp_gpu.py's), bf16, max_model_len 4096, gpu_memory_utilization 0.95,
# max_num_seqs 128 (the seed's vLLM command line); every engine and server in its own process.
# Two device calls, each ending itself before 580 s even if every step times out (budgets below):
#   bash benchmarks/multi4_gpu.sh part1   (~5-7 min, at most ~545 s; carry nothing)
#       TP=4 (`all`: the TP=4 default, one-shot all-reduce up to 1 MiB) then TP=2 x PP=2: greedy ids
#       (32 prompts x 64 tokens), start-up, KV tokens, thr512, b1_decode, ttft1024 (tp_gpu.py peers);
#       TP=2 (`push4m`, its default) on GPUs 0,1: ids; match rates of the three pairs.
#   bash benchmarks/multi4_gpu.sh part2   (~7-8 min, at most 575 s; carry .devcarry/serve)
#       the all-reduce check on 4 GPUs (tp_gpu.py allreduce 4: one-shot vs NCCL, sums and in-graph
#       latencies), then `pagedserve serve MODEL --tensor-parallel-size 4` and `--tensor-parallel-size 2
#       --pipeline-parallel-size 2` (+ --max-model-len 4096 --gpu-memory-utilization 0.95 --max-num-seqs
#       128), each driven by `pagedserve bench serve` at 4 then 16 req/s (serve_gpu.py: peers dataset,
#       200 prompts a rate, P50/P99 TTFT, TPOT, ITL, throughput).
# .devcarry/serve (git-ignored, 5.4 MB; `bash benchmarks/serve_gpu_prepare.sh` makes it): the Llama-3
# tokenizer the servers need (vocab 128,256 = the config's) and the server's wheels the GPU image lacks.
# Raw output under $OUT: results.txt (RESULT lines, then the summary) and per part at most 8 files.
# DRY=1 runs every step on CPU (tp_gpu.py's tiny model, gloo, 4 ranks; serve_gpu.py --cpu-smoke): the
# script's own check, no timing meaning (all-reduce check skipped: it needs GPUs).
set -uo pipefail
export PYTHONPATH=$PWD:/tmp/site_s PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  TP_MODEL=llama-70b MAX_LEN=4096 GPU_UTIL=0.95 MAX_SEQS=128 TRITON_CACHE_DIR=/tmp/triton_serve_gpu
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${DRY:-0}" = 1 ]; then PY=${PY:-/work/main/.venv/bin/python}; SMOKE=--cpu-smoke
else PY=python3; SMOKE=; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/results.txt"; fi
echo "$(date -u) $(git log -1 --format=%h 2>/dev/null) ${1:-}" | tee -a "$OUT/results.txt"
run() {   # run LIMIT_S NAME ARGS...: tp_gpu.py ARGS into $OUT/NAME.log, its RESULT and error lines to results.txt
  local limit=$1 name=$2; shift 2
  timeout "$limit" "$PY" benchmarks/tp_gpu.py "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  grep -E "^RESULT|Error|Traceback" "$OUT/$name.log" | grep -v "_host_phases" | awk '!seen[$0]++' | tail -12 \
    | cut -c1-1500 | tee -a "$OUT/results.txt"
  [ $rc = 0 ] || echo "exit $rc: $name ($*)" | tee -a "$OUT/results.txt"; }
case ${1:-} in
  part1)
    run 200 tp4 peers 4 all "$OUT/ids_tp4.json"
    PP=2 run 220 tp2pp2 peers 2 all "$OUT/ids_tp2pp2.json"
    CUDA_VISIBLE_DEVICES=0,1 run 110 tp2 ids 2 push4m "$OUT/ids_tp2.json"
    for pair in "tp4 tp2pp2" "tp4 tp2" "tp2pp2 tp2"; do set -- $pair
      [ -f "$OUT/ids_$1.json" ] && [ -f "$OUT/ids_$2.json" ] && \
        "$PY" benchmarks/tp_gpu.py compare "$OUT/ids_$1.json" "$OUT/ids_$2.json" | tee -a "$OUT/results.txt"; done ;;
  part2)
    run 100 allreduce4 allreduce 4
    if [ -z "$SMOKE" ]; then   # the server's packages, as serve_gpu.sh installs them
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_s \
        .devcarry/serve/wheels/*.whl || { echo "server wheels failed to install" | tee -a "$OUT/results.txt"; exit 1; }
    fi
    timeout $((575 - SECONDS)) "$PY" benchmarks/serve_gpu.py $SMOKE --skip-startup --engines pagedserve \
      --variants tp4,tp2pp2 --rates 4,16 --budget-s $((555 - SECONDS)) > "$OUT/console.txt" 2>&1
    echo "serve_gpu.py exit $? after $SECONDS s" | tee -a "$OUT/results.txt"
    grep -E "^RESULT" "$OUT/console.txt" >> "$OUT/results.txt"
    (cd "$OUT" && ls steps_*.json >/dev/null 2>&1 && tar czf steps.tgz steps_*.json && rm -f steps_*.json)
    cat "$OUT/serve_gpu.md" 2>/dev/null || tail -20 "$OUT/console.txt" ;;
  *) echo "usage: bash benchmarks/multi4_gpu.sh part1|part2"; exit 2 ;;
esac
echo "=== summary ($SECONDS s)" | tee -a "$OUT/results.txt"
"$PY" benchmarks/tp_gpu.py summary "$OUT/results.txt" | tee -a "$OUT/results.txt"
