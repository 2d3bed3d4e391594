#!/usr/bin/env bash
# Issue 22, session 22, one nvidia-h200 call (~4-5 min): the RMSNorm kernel with its weight loaded
# beside the row (this tree) against the tree in $BEFORE (the weight loaded after the sum), each in
# its own process, alternating: `decode_gpu.py --stages models` on llama-8b and llama-1b (b1_decode,
# the bs-1 decode replay and its per-kernel table, rms_norm's line included).
# Set-up: git archive COMMIT pagedserve | tar -x -C .devcarry/before; carry .devcarry/before and
# .devcarry/peers.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/norm_ab}
BEFORE=${BEFORE:-.devcarry/before}
mkdir -p "$OUT"
T0=$(date +%s)
for i in 1 2; do
  for v in before now; do
    [ $(( $(date +%s) - T0 )) -gt ${BUDGET:-420} ] && break 2
    pp=$PWD; [ $v = before ] && pp=$PWD/$BEFORE:$PWD
    # from /tmp: `python3 -c` puts the working directory ahead of PYTHONPATH (session 22's call printed
    # the repo's package for "before"; the script runs below, whose sys.path[0] is benchmarks/, did take
    # $BEFORE's: their rms_norm lines differ)
    (cd /tmp && PYTHONPATH=$pp python3 -c "import pagedserve, os; print('$v', os.path.dirname(pagedserve.__file__))")
    mkdir -p "$OUT/${v}_$i"
    PYTHONPATH=$pp OUT=$OUT/${v}_$i timeout 170 python3 benchmarks/decode_gpu.py --stages models --variants default \
      --ab "" --models llama-8b,llama-1b --thr "" > "$OUT/${v}_$i.txt" 2>&1
    echo "$v $i rc=$? $(( $(date +%s) - T0 )) s"
    grep -E "b1_decode .* tok/s|rms_norm|total \(kernels\)" "$OUT/${v}_$i.txt"
  done
done
