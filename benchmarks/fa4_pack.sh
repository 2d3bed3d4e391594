#!/usr/bin/env bash
# Makes .devcarry/f0 f1 f2 (git-ignored) for benchmarks/fa4_probe_gpu.sh: flash-attn-4 and the CuTe DSL wheels the
# GPU image lacks (cp312, manylinux_2_28; the image has cuda-bindings, protobuf and einops), in one tar stream split
# into three 36 MiB pieces, one a device call (a call carries <= 64 MiB with the tree). Run from the repo root.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .devcarry/fa4w .devcarry/f0 .devcarry/f1 .devcarry/f2 && mkdir -p .devcarry/fa4w
for p in flash-attn-4==4.0.0b40 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 \
  nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 torch-c-dlpack-ext==0.1.5 apache-tvm-ffi==0.1.11; do
  python3 -m pip download -q --pre --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform any -d .devcarry/fa4w "$p"
done
tmp=$(mktemp -d)
tar cf - -C .devcarry fa4w | split -b 36m -d -a 1 - "$tmp/piece."
for f in "$tmp"/piece.*; do mkdir -p ".devcarry/f${f##*.}" && mv "$f" ".devcarry/f${f##*.}/"; done
rmdir "$tmp"
du -sh .devcarry/f?
