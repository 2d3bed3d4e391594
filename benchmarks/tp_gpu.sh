#!/usr/bin/env bash
# Issues 9 and 17 on nvidia-h200-x2 (NVLink multicast off, as KINDS.md asks), llama-8b dummy weights.
# DRY=1 runs it on CPU with a tiny model (no allreduce check): the script's own test.
# Usage (device tool, two calls, each under 10 minutes even if every step times out):
#   bash benchmarks/tp_gpu.sh check profile      (~5 min)
#   bash benchmarks/tp_gpu.sh time               (~6 min)
#   check    custom all-reduce vs NCCL (sums, in-graph, latency); greedy ids TP=2 (all, base) vs TP=1,
#            and TP=2 all vs base (the new pieces should change no token)
#   profile  torch.profiler of TP=2 batch-1 decode steps on rank 0, before (base) and after (all)
#   time     thr512 / b1_decode / ttft1024: TP=1 (its default, async), then TP=2 base, shm, car, all
#            (see tp_gpu.py VARIANTS; VARIANTS="base all" SKIP_TP1=1 for fewer)
#   quick    time, TP=2 all only
#   shutdown (~3-4 min) issue 17 part 1: a TP=2 script's end, shutdown(), gc, Ctrl-C, and serve's SIGTERM /
#            Ctrl-C mid-request, each under 10 s with no rank or engine core left (benchmarks/shutdown_gpu.py)
#   tp17c    (~100 s) whether a pageable host -> device copy waits for a busy GPU (h2d), then thr512 /
#            b1_decode at TP=2 (push4m) with step inputs through pinned memory (now) and pageable (before)
#   tp17b    thr512 and b1_decode, TP=2: `all`, `push4m` (the push all-reduce up to 4 MiB: decode steps up to
#            512 rows; + ids: it must change no token), and `push4m` with max_num_batched_tokens 16384
#            (vLLM's default for its LLM class on 70+ GiB GPUs; ours is 8192)
#   tp17     issue 17 part 2, second pass (~220 s, at most 440): all-reduce check + latency (NCCL,
#            torch's one-shot, the push kernel), the M=1 gemv launch sweep at TP=2's weight shards, then
#            one engine each (ids, peers with rank 0's and rank 1's host phases, the decode profile by
#            kernel kind): TP=2 `all` as it is, and `push` (push all-reduce) with the swept launch shapes
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/machine.txt"; date -u | tee -a "$OUT/machine.txt"
run() { local log="$OUT/log_$(echo "${@:2:3}${GEMV_CONFIGS:+_tuned}${MAX_BATCHED:+_mbt$MAX_BATCHED}${PAGEABLE_INPUTS:+_pageable}" | tr -c 'A-Za-z0-9\n' '_').txt"
        timeout "$1" python3 benchmarks/tp_gpu.py "${@:2}" > "$log" 2>&1; local rc=$?
        grep -E "^RESULT|RANK_PHASES|Error|error|Traceback|custom all-reduce|step queue|captured" "$log" | awk '!seen[$0]++' | tail -12 | tee -a "$OUT/results.txt"
        [ $rc = 0 ] || echo "exit $rc: ${*:2}" | tee -a "$OUT/results.txt"; }
for stage in ${*:-check profile time}; do
  echo "=== $stage"
  case $stage in
    check) run 90 allreduce
           run 80 ids 1 all "$OUT/ids_tp1.json"
           run 100 ids 2 all "$OUT/ids_tp2_all.json"
           run 100 ids 2 base "$OUT/ids_tp2_base.json"
           for pair in "tp1 tp2_all" "tp1 tp2_base" "tp2_base tp2_all"; do set -- $pair
             python3 benchmarks/tp_gpu.py compare "$OUT/ids_$1.json" "$OUT/ids_$2.json" | tee -a "$OUT/results.txt"; done ;;
    profile) for v in base all; do
               timeout 110 python3 benchmarks/tp_gpu.py profile 2 $v > "$OUT/profile_tp2_$v.txt" 2>&1 || echo "exit $?: profile $v"
               grep -E "^RESULT|Error|Traceback" "$OUT/profile_tp2_$v.txt" | tee -a "$OUT/results.txt"; done ;;
    time) [ "${SKIP_TP1:-0}" = 1 ] || run 100 peers 1 all
          for v in ${VARIANTS:-base shm car all}; do run 120 peers 2 $v; done ;;
    quick) run 120 peers 2 all ;;
    shutdown) timeout 480 python3 benchmarks/shutdown_gpu.py 2>&1 | tee "$OUT/shutdown.txt" | grep -E "^RESULT|^SUMMARY" \
                | tee -a "$OUT/results.txt" ;;
    tp17) [ "${DRY:-0}" = 1 ] || run 90 allreduce
          run 90 sweep 2 "$OUT/gemv_tp2.json"
          export RANK_PHASES=1
          run 130 suite 2 all "$OUT/tp2_all"
          GEMV_CONFIGS="$OUT/gemv_tp2.json"; export GEMV_CONFIGS
          run 130 suite 2 push "$OUT/tp2_push_tuned"
          unset GEMV_CONFIGS RANK_PHASES
          python3 benchmarks/tp_gpu.py compare "$OUT/tp2_all_ids.json" "$OUT/tp2_push_tuned_ids.json" \
            | tee -a "$OUT/results.txt" ;;
    tp17c) run 30 h2d   # ~100 s: does a pageable copy wait for the busy GPU? then thr512 with / without pinned inputs
          export RANK_PHASES=1
          run 60 ab 2 push4m "$OUT/c_pinned"
          PAGEABLE_INPUTS=1; export PAGEABLE_INPUTS
          run 60 ab 2 push4m "$OUT/c_pageable"
          unset PAGEABLE_INPUTS RANK_PHASES
          python3 benchmarks/tp_gpu.py compare "$OUT/c_pinned_ids.json" "$OUT/c_pageable_ids.json" | tee -a "$OUT/results.txt" ;;
    tp17b) export RANK_PHASES=1   # thr512 A/B, b1 in each arm (~135 s, at most 180)
          run 60 ab 2 all "$OUT/ab_all"
          run 60 ab 2 push4m "$OUT/ab_push4m"
          python3 benchmarks/tp_gpu.py compare "$OUT/ab_all_ids.json" "$OUT/ab_push4m_ids.json" | tee -a "$OUT/results.txt"
          MAX_BATCHED=16384; export MAX_BATCHED
          run 60 ab 2 push4m
          unset MAX_BATCHED RANK_PHASES ;;
  esac
done
