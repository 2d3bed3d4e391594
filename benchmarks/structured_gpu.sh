#!/usr/bin/env bash
# Issue 20 on nvidia-h200 in one call (~130 s expected, bounded to ~250 s): the 64-request
# JSON-schema overhead on a llama-1b shape (random weights, the default model's tokenizer:
# .devcarry/smolbench) for this branch and for main's code, each a process of its own, in turns
# (branch, main, branch, main: a slow spell of the host hits both trees), each schema run timed
# in turns with its plain run (benchmarks/structured_overhead.py: the same harness in both trees;
# VARIANTS, default "process": the grammar process, the engine's default under async scheduling).
# First a CUDA check of the masked greedy argmax against xgrammar's mask + torch's argmax.
# The trees are snapshots (git archive), so the worktree may move on while this waits:
#   bash benchmarks/structured_gpu.sh --snapshot   (here, not on the device) main's committed tree
#       and this branch's committed tree into .devcarry/main_snapshot and .devcarry/branch_snapshot,
#       both with this branch's benchmark harness
# Needs xgrammar and its py3.12 deps carried in .whl/ (pip download, see DEVICE_READY).
# Carry: .devcarry/smolbench .devcarry/main_snapshot .devcarry/branch_snapshot .whl
# SMOKE=1: the same calls on the CPU (a tiny random llama, 8 requests, one repeat).
if [[ "${1:-}" == "--snapshot" ]]; then
  main_dir=$(git worktree list | awk '$3 == "[main]" {print $1}')
  for tree in main branch; do
    rm -rf ".devcarry/${tree}_snapshot" && mkdir -p ".devcarry/${tree}_snapshot/benchmarks"
    if [[ $tree == main ]]; then repo=$main_dir; ref=main; else repo=$PWD; ref=HEAD; fi
    git -C "$repo" archive "$ref" pagedserve | tar -x -C ".devcarry/${tree}_snapshot"
    git -C "$repo" log -1 --format='%h %s' "$ref" | cut -c1-120 > ".devcarry/${tree}_snapshot/COMMIT"
    git show HEAD:benchmarks/structured_overhead.py > ".devcarry/${tree}_snapshot/benchmarks/structured_overhead.py"
    echo "$tree: $(cat .devcarry/${tree}_snapshot/COMMIT)"
  done
  exit 0
fi
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$PWD
python3 -c "import xgrammar" 2>/dev/null || python3 -m pip install -q --no-deps --target /tmp/xgsite .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/xgsite
python3 -c "import xgrammar; print('xgrammar', xgrammar.__file__)" || exit 1
{ nproc; lscpu | grep -E "^(Model name|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\))"
  nvidia-smi --query-gpu=name --format=csv,noheader; cat .devcarry/branch_snapshot/COMMIT .devcarry/main_snapshot/COMMIT
  date -u; } 2>&1 | tee "$OUT/machine.txt"
# can a shared-memory segment be page-locked in place (the grammar process's mask)? if not, stage it
REGISTER=""
[[ -n "${SMOKE:-}" ]] || (cd .devcarry/branch_snapshot && PYTHONPATH=$PWD:/tmp/xgsite timeout 30 python3 - <<'PY'
import torch
from multiprocessing import shared_memory
import numpy as np
shm = shared_memory.SharedMemory(create=True, size=64 * 1536 * 4)
try:
    host = torch.from_numpy(np.ndarray((64, 1536), dtype=np.int32, buffer=shm.buf))
    host.fill_(7)
    from pagedserve.worker.host_kv_cache import _register, _unregister
    _register(host.data_ptr(), host.numel() * 4)
    device = host.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert int(device.sum()) == 7 * host.numel()
    _unregister(host.data_ptr())
    del host, device
    print("REGISTER ok")
finally:
    shm.unlink()
PY
) 2>&1 | tee "$OUT/register_check.txt" | tail -1 | grep -q "^REGISTER ok" || REGISTER="--no-register"
[[ -n "${SMOKE:-}" ]] && REGISTER=""
echo "register flag: '${REGISTER}'" | tee -a "$OUT/machine.txt"
# the masked argmax on the device against xgrammar's mask then torch's argmax (bf16 / fp32, 64 x 49,152)
[[ -n "${SMOKE:-}" ]] || (cd .devcarry/branch_snapshot && PYTHONPATH=$PWD:/tmp/xgsite timeout 60 python3 - <<'PY'
import torch, xgrammar
from pagedserve.layers.triton_ops import argmax_rows
g = torch.Generator(device="cuda").manual_seed(0)
for dtype in (torch.bfloat16, torch.float32):
    for rows, n in ((64, 49152), (3, 49152), (64, 128256)):
        x = torch.randn(rows, n, device="cuda", generator=g).to(dtype)
        words = -(-n // 32)
        mask = torch.randint(-2**31, 2**31 - 1, (rows, words), device="cuda", generator=g, dtype=torch.int64).to(torch.int32)
        mask[0] = 0; mask[0, 5] = 1 << 3      # one token allowed
        mask[1] = -1                          # all allowed
        ref = x.clone()
        xgrammar.apply_token_bitmask_inplace(ref, mask, vocab_size=n)
        got = argmax_rows(x, mask)
        assert torch.equal(got, ref.argmax(dim=-1)), (dtype, rows, n)
        assert int(got[0]) == 5 * 32 + 3
print("FUSED ok")
PY
) 2>&1 | tee "$OUT/fused_check.txt" | tail -1
model_args() { if [[ -n "${SMOKE:-}" ]]; then echo "--cpu-smoke --model ../smolbench --repeats 1";
               else echo "--device cuda --dtype bfloat16 --model ../smolbench --load-format dummy --repeats ${REPEATS:-8}"; fi; }
run_tree() {   # tree, round, timeout, variants
  (cd ".devcarry/$1_snapshot" && PYTHONPATH=$PWD:/tmp/xgsite timeout "$3" python3 benchmarks/structured_overhead.py \
    $(model_args) --variants "$4" $REGISTER 2>&1) \
    | tee "$OUT/overhead_1b_$1_$2.txt" | grep -E "^ *(RESULT|[a-z]+:)|Error|skipped" | cut -c1-2000
}
for round in 1 2; do
  if (( round == 2 && SECONDS > 105 )); then echo "round 2 skipped: $SECONDS s gone"; break; fi
  echo "== round $round, branch ($SECONDS s)"; run_tree branch $round 80 "${VARIANTS:-process}"
  echo "== round $round, main ($SECONDS s)"; run_tree main $round 55 process
done
echo "done after $SECONDS s"
