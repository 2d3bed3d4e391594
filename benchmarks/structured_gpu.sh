#!/usr/bin/env bash
# Issue 20 on nvidia-h200 in one call (~120 s expected; the timeouts bound it at 280 s plus the wheel install): the grammar
# fill / accept / grammar-process microbenchmark without a model, then the 64-request JSON-schema
# overhead on a llama-1b and a llama-8b shape (random weights, the default model's tokenizer:
# .devcarry/smolbench and .devcarry/smolbench8b), each schema run in variants (process: accept +
# fill in the grammar process, the default under async scheduling; process4 (1b only): its fill on 4 threads; inline: in-engine
# matchers) against the plain run, in turns. Needs xgrammar and its py3.12 deps carried in .whl/.
# Carry: .devcarry/smolbench .devcarry/smolbench8b .whl
set -uo pipefail
export PYTHONPATH=$PWD:/tmp/xgsite PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import xgrammar" 2>/dev/null || python3 -m pip install -q --no-deps --target /tmp/xgsite .whl/*.whl 2>&1 | grep -v WARNING | tail -2
python3 -c "import xgrammar; print('xgrammar', xgrammar.__file__)" || exit 1
python3 -c "import jsonschema" 2>/dev/null || echo "jsonschema not installed: schema validity not checked (json.loads only)"
nproc | tee "$OUT/machine.txt"; nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$OUT/machine.txt"
git log -1 --format='%h %s' | tee -a "$OUT/machine.txt"; date -u | tee -a "$OUT/machine.txt"
# can a shared-memory segment be page-locked in place (the grammar process's mask)? if not, stage it
REGISTER=""
timeout 30 python3 - <<'PY' 2>&1 | tee "$OUT/register_check.txt" | tail -1 | grep -q "^REGISTER ok" || REGISTER="--no-register"
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
    print("is_pinned", host.is_pinned())
    _unregister(host.data_ptr())
    del host, device
    print("REGISTER ok")
finally:
    shm.unlink()
PY
echo "register flag: '${REGISTER}'" | tee -a "$OUT/machine.txt"
SHAPES=${SHAPES:-fill 1b 8b}   # e.g. SHAPES=1b: the llama-1b shape only
if [[ " $SHAPES " == *" fill "* ]]; then
  timeout 50 python3 benchmarks/grammar_fill.py --tokenizer .devcarry/smolbench --threads ${THREADS:-4} 2>&1 \
    | tee "$OUT/grammar_fill.txt" | grep -E "RESULT|Error"
fi
if [[ " $SHAPES " == *" 1b "* ]]; then
  timeout 100 python3 benchmarks/structured_overhead.py --device cuda --dtype bfloat16 --model .devcarry/smolbench \
    --load-format dummy --repeats 5 --variants process,process4,inline --profile $REGISTER 2>&1 | tee "$OUT/overhead_1b.txt" | grep -E "RESULT|Error|overhead"
fi
if [[ " $SHAPES " == *" 8b "* ]]; then
  timeout 100 python3 benchmarks/structured_overhead.py --device cuda --dtype bfloat16 --model .devcarry/smolbench8b \
    --load-format dummy --repeats 3 $REGISTER 2>&1 | tee "$OUT/overhead_8b.txt" | grep -E "RESULT|Error|overhead"
fi
echo "done after $SECONDS s"
