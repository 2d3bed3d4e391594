#!/usr/bin/env bash
# Issue 22, one nvidia-h200 call: this tree ("now") against the package in $BEFORE ("before"), each
# in its own process, alternating, for a change to the decode kernels. STEPS (default tests,sweep,models), in order:
#   tests   the kernel tests on the GPU with this tree (bit for bit against the references; ~1-2 min)
#           (TESTS_FILES: the files instead of the paged-attention and store tests; TESTS_K: a pytest -k
#           filter; TESTS_S: its timeout, 200 s: the whole two files take longer)
#   sweep   benchmarks/fused_decode_sweep.py: one layer's decode attention, fused (rotary + store in
#           the launch) vs rotary_store_kv + the plain launch, 1-512 rows, us a layer (~30 s each)
#   models  decode_gpu.py --stages models on llama-8b and llama-1b: b1_decode, the bs-1 decode replay
#           and its per-kernel table (~70 s each), PAIRS times each way (default 2)
#   fusedmax thr512 (thr_spread.py, llama-1b then llama-8b) with this tree at fused_decode_max_seqs
#           FUSED_MAX_A then _B (default 64: the layer's path before
#           session 24; 512), one process each, alternating, PAIRS times (~40-70 s each)
#   thr     thr512 (thr_spread.py, THR_MODELS: llama-1b then llama-8b) before and now, one process
#           each, alternating, PAIRS times (~40-70 s each)
#   tail    attn_gpu.py's tail stage with this tree at llama-8b's then llama-1b's heads: TAIL_SHAPES
#           (default the one-row shapes, bounds 2048 to 32768, and 4 / 16 rows at 400 keys), TAIL_PLANS forced beside the
#           default (default: the 64-key-tile plan of main before session 24's narrow launch, and the
#           narrow one: 32-key tiles, 2 stages, thresholds in 32-key tiles) (~40 s each)
# Set-up: git archive COMMIT pagedserve | tar -x -C .devcarry/before; carry .devcarry/before and
# .devcarry/peers.py. Session 22 ran the models step as norm_ab_gpu.sh (RMSNorm's weight load).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ab}
BEFORE=${BEFORE:-.devcarry/before}
STEPS=${STEPS:-tests,sweep,models}
mkdir -p "$OUT"
T0=$(date +%s)
late() { [ $(( $(date +%s) - T0 )) -gt ${BUDGET:-540} ]; }
path_of() { if [ "$1" = before ]; then echo "$PWD/$BEFORE:$PWD"; else echo "$PWD"; fi; }
# from /tmp: `python3 -c` puts the working directory ahead of PYTHONPATH (a run from the repo root
# printed the repo's package for "before"; the scripts below, whose sys.path[0] is benchmarks/, take $BEFORE's)
for v in before now; do p=$(path_of $v); (cd /tmp && PYTHONPATH=$p python3 -c "import pagedserve, os; print('$v', os.path.dirname(pagedserve.__file__))"); done
if [[ $STEPS == *tests* ]]; then
  timeout ${TESTS_S:-200} python3 -m pytest -q -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} \
    ${TESTS_FILES:-tests/kernels/test_paged_attention.py tests/kernels/test_store_kv.py} \
    > "$OUT/tests.txt" 2>&1
  echo "tests rc=$? $(( $(date +%s) - T0 )) s: $(tail -1 "$OUT/tests.txt")"
fi
if [[ $STEPS == *sweep* ]]; then
  for v in before now; do
    late && break
    PYTHONPATH=$(path_of $v) timeout 120 python3 benchmarks/fused_decode_sweep.py > "$OUT/sweep_$v.txt" 2>&1
    echo "sweep $v rc=$? $(( $(date +%s) - T0 )) s"; tail -4 "$OUT/sweep_$v.txt"
  done
fi
if [[ $STEPS == *models* ]]; then
  for i in $(seq ${PAIRS:-2}); do
    for v in before now; do
      late && break 2
      mkdir -p "$OUT/${v}_$i"
      PYTHONPATH=$(path_of $v) OUT=$OUT/${v}_$i timeout 170 python3 benchmarks/decode_gpu.py --stages models \
        --variants default --ab "" --models llama-8b,llama-1b --thr "" > "$OUT/${v}_$i.txt" 2>&1
      echo "$v $i rc=$? $(( $(date +%s) - T0 )) s"
      grep -E "b1_decode .* tok/s|paged_attention|rms_norm|total \(kernels\)" "$OUT/${v}_$i.txt"
    done
  done
fi
if [[ $STEPS == *fusedmax* ]]; then
  for model in llama-1b llama-8b; do
    for i in $(seq ${PAIRS:-2}); do
      for m in ${FUSED_MAX_A:-64} ${FUSED_MAX_B:-512}; do
        late && break 3
        timeout 150 python3 benchmarks/thr_spread.py "$OUT/thr_${model}_${m}_$i" --runs 1 --no-smi --model $model \
          --fused-max $m > "$OUT/thr_${model}_${m}_$i.txt" 2>&1
        echo "thr $model fused_max=$m run $i rc=$? $(( $(date +%s) - T0 )) s: $(grep -o '"out_tok_s": [0-9.]*\|"decode_span_s": [0-9.]*\|"gpu_span_s": [0-9.]*' "$OUT/thr_${model}_${m}_$i.txt" | tr '\n' ' ')"
      done
    done
  done
fi
if [[ $STEPS == *thr* ]]; then
  # from a directory whose "." holds no pagedserve (thr_spread.py puts "." first on sys.path)
  mkdir -p /tmp/thr_wd && ln -sfn "$PWD/.devcarry" /tmp/thr_wd/.devcarry
  for model in ${THR_MODELS:-llama-1b llama-8b}; do
    for i in $(seq ${PAIRS:-2}); do
      for v in before now; do
        late && break 3
        p=$(path_of $v); repo=$PWD
        echo "gpu before: $(nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active --format=csv,noheader 2>&1)"
        (cd /tmp/thr_wd && PYTHONPATH=$p timeout 150 python3 "$repo/benchmarks/thr_spread.py" \
          "$OUT/thr_${model}_${v}_$i" --runs 1 --no-smi --model $model > "$OUT/thr_${model}_${v}_$i.txt" 2>&1)
        echo "thr $model $v run $i rc=$? $(( $(date +%s) - T0 )) s: $(grep -o '"out_tok_s": [0-9.]*\|"decode_span_s": [0-9.]*\|"gpu_span_s": [0-9.]*\|"host_wait_s": [0-9.]*' "$OUT/thr_${model}_${v}_$i.txt" | tr '\n' ' ')"
      done
    done
  done
fi
if [[ $STEPS == *tail* ]]; then
  for heads in 32,8,128 32,8,64; do
    late && break
    PYTHONPATH=$PWD timeout 150 python3 benchmarks/attn_gpu.py --stages tail --quick --heads $heads \
      --shapes ${TAIL_SHAPES:-b1_128,b1_400,b1_1k,b1_4k,b1_400_b32k,b1_16k,b4_400,b16_400} \
      --plans ${TAIL_PLANS:-32:2:64:4:3:8:2,32:2:32:4:2:16:4} > "$OUT/tail_$heads.txt" 2>&1
    echo "tail heads $heads rc=$? $(( $(date +%s) - T0 )) s"; grep -A60 "^shape" "$OUT/tail_$heads.txt"
  done
fi
