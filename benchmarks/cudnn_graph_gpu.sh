#!/usr/bin/env bash
# Issue 22, long64: every prefill chunk of a long step in one cuDNN graph call a layer
# (attention/cudnn_prefill.py, TritonBackend.long_chunk_path "cudnn_graph", the default since) against the path before
# (torch's cuDNN op on round chunks, the Triton kernel on the rest), in one device call on
# nvidia-h200 (~5 min). Carry .devcarry/peers.py and .devcarry/cfe (the nvidia-cudnn-frontend
# wheel the GPU image lacks: benchmarks/stage_devcarry.sh). The kernel tests with the real graph
# first, then attn_gpu.py's engine stages: ttft16k (walls, profile by kernel class) and
# peers_long.py's long64 for each mode on one engine. `bash benchmarks/cudnn_graph_gpu.sh micro`:
# cudnn_graph_micro.py alone (the attention of three shapes by path, ~1 min).
set -uo pipefail
export PYTHONPATH=$PWD:/tmp/cfe_site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PAGEDSERVE_TEST_DEVICE=cuda
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"
  date -u +%Y-%m-%dT%H:%MZ; } | tee "$OUT/machine.txt"
python3 -m pip install -q --no-deps --target /tmp/cfe_site .devcarry/cfe/nvidia_cudnn_frontend-*.whl 2>&1 | tail -2
python3 -c "import cudnn; print('cudnn-frontend', cudnn.__version__, 'backend', cudnn.backend_version())" | tee -a "$OUT/machine.txt"
if [ "${1:-}" = micro ]; then   # attention alone: where the graph loses against torch's op (~1 min)
  timeout 150 python3 benchmarks/cudnn_graph_micro.py > "$OUT/micro.txt" 2>&1; echo "MICRO rc=$?"
  grep -E "RESULT|Error" "$OUT/micro.txt" | cut -c1-900
  exit 0
fi
MODES=${MODES:-cudnn_by_sequence,cudnn_graph_paged,cudnn_graph_gathered}
timeout 200 python3 -m pytest -q -x tests/kernels/test_cudnn_prefill.py tests/kernels/test_prefill_attention.py \
    > "$OUT/tests.txt" 2>&1; echo "TESTS rc=$?"; tail -15 "$OUT/tests.txt"
timeout 400 python3 benchmarks/attn_gpu.py --stages engine,long64 --modes "$MODES" ${SKIP_CHECK:+--skip-check} > "$OUT/attn.txt" 2>&1
echo "ATTN rc=$?"
grep -E "RESULT|graph .* built|Error|error|failed" "$OUT/attn.txt" | cut -c1-400
