#!/usr/bin/env bash
# Packs what issue 22's same-machine comparison with vLLM needs on the GPU machine into pieces that each
# travel in one device call beside the working tree (a call carries <= 64 MiB with the tree, ~21 MiB of it in
# git): ../shared/bench/vllm_bundle.sh's parts (.peer/a-d: vLLM 0.24.0 and the packages the image lacks) and the
# default GGUF's three parts with the gguf wheel (.devcarry/gg1-3, benchmarks/stage_devcarry.sh) in one tar
# stream, split into .devcarry/s0 ... s6 (36 MiB each). benchmarks/vllm_same_gpu.sh copies the piece a call
# carries to /tmp/stage and, once all are there, unpacks them. Run from the repo root after
# `bash ../shared/bench/vllm_bundle.sh` and `bash benchmarks/stage_devcarry.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .devcarry/s[0-9] .devcarry/stage_tmp && mkdir -p .devcarry/stage_tmp
tar cf - -C .peer a b c d -C ../.devcarry gg1 gg2 gg3 | split -b 36m -d -a 1 - .devcarry/stage_tmp/piece.
for f in .devcarry/stage_tmp/piece.*; do mkdir -p ".devcarry/s${f##*.}" && mv "$f" ".devcarry/s${f##*.}/"; done
rmdir .devcarry/stage_tmp
(cd .devcarry && cat s*/piece.* | sha256sum | cut -c1-64 > pack.sha256 && ls -d s[0-9] | wc -l > pack.count)
du -sh .devcarry/s[0-9]
