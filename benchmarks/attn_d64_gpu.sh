#!/usr/bin/env bash
# Issue 22, session 22, one nvidia-h200 call (~9 min, ends itself by ~570 s): is llama-1b's decode
# attention (head_dim 64: ~59% of a 256-row decode step, 3.5 TB/s in session 15's batch profile,
# where llama-8b's head_dim 128 reads 3.9) held back by its launch shape?
#   1. attn_gpu.py's tail stage at llama-1b heads (32, 8, 64): the decode kernel alone at thr512's
#      decode shapes and batch 1, every launch shape of TILES checked then timed (~2 min);
#   2. (session 22 only: thr512 on llama-1b, default against the sweep's best launch shape in
#      interleaved processes, through an A/B hook deleted after the run: commit cae7828)
#   3. with the time left: the one-row gemv sweep over tensor-parallel shards (decode_gpu.py sweep).
# DRY=1: the CPU smoke of stage 1.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:$PWD/benchmarks
OUT=${OUT:-/tmp/attn_d64}
mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $((${BUDGET:-570} - ($(date +%s) - T0))); }
TILES=${TILES:-64:4:3,64:4:2,64:4:4,64:8:3,64:2:3,128:4:2,128:4:3,128:8:2,128:8:3,256:4:2,256:8:2,32:4:3,32:4:4}
SHAPES=thr512_400,thr256_600,thr256_1k,thr384_800,thr128_1k,b1_400,b1_1k
if [ -n "${DRY:-}" ]; then
  exec python3 benchmarks/attn_gpu.py --cpu-smoke --stages tail --tiles 32:4:2,64:4:2
fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv; date -u; git log -1 --oneline; } \
  > "$OUT/machine.txt" 2>&1

echo "=== 1. decode attention at head_dim 64 ($(left) s left)"
timeout 200 python3 benchmarks/attn_gpu.py --stages tail --heads 32,8,64 --shapes "$SHAPES" --tiles "$TILES" \
  > "$OUT/tail_d64.txt" 2>&1
echo "tail rc=$?"
grep -v '^RESULT' "$OUT/tail_d64.txt" | tail -80
# the sweep's best launch shape over the thr shapes (sum of us), as T:W:S
BEST=$(python3 - "$OUT/tail_d64.txt" <<'EOF'
import json, re, sys
rows = [json.loads(l[7:]) for l in open(sys.argv[1]) if l.startswith("RESULT ")]
thr = ("thr512_400", "thr256_600", "thr256_1k", "thr384_800")
tot = {}
for r in rows:
    if r.get("stage") == "tail" and r.get("shape") in thr and "us" in r and r["diff_ok"]:
        m = re.fullmatch(r"chunk1024keys_t(\d+)w(\d+)s(\d+)", r["variant"])
        if m:
            tot.setdefault(":".join(m.groups()), {})[r["shape"]] = r["us"]
full = {k: sum(v.values()) for k, v in tot.items() if len(v) == len(thr)}
for k, v in sorted(full.items(), key=lambda kv: kv[1]):
    print(f"  {k}: {v:.1f} us over {len(thr)} shapes", file=sys.stderr)
print(min(full, key=full.get) if full else "")
EOF
)
echo "best launch shape at the thr shapes: ${BEST:-none}"

if [ "$(left)" -gt 100 ]; then
  echo "=== 3. one-row gemv over tensor-parallel shards ($(left) s left)"
  OUT=$OUT timeout $(($(left) - 20)) python3 benchmarks/decode_gpu.py --stages sweep \
    --models llama-8b-tp2,llama-70b-tp2,llama-70b-tp4 > "$OUT/sweep_tp.txt" 2>&1
  echo "sweep rc=$?"
  grep -v '^RESULT' "$OUT/sweep_tp.txt" | grep -i "MiB\|CHECK\|error" | tail -20
fi
echo "=== done in $(($(date +%s) - T0)) s"
