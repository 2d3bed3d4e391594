"""Importing pagedserve sets libgomp's spin count before torch loads it, unless the user chose
a wait policy (pagedserve/__init__.py; benchmarks/RESULTS.md, issue 19)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "import pagedserve, os, sys; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"


@pytest.mark.parametrize("env, expected", [
    ({}, "2000 True"),
    ({"GOMP_SPINCOUNT": "50000"}, "50000 True"),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "None True"),
])
def test_spin_count_default(env: dict, expected: str) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", CODE], env={**base, **env}, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.split("\n")[-2] == expected, out.stdout


def test_set_before_torch_is_imported() -> None:
    """The assignment comes before any import that loads torch (libgomp reads it once, at load)."""
    import pagedserve
    source = open(pagedserve.__file__).read()
    assert source.index('_os.environ["GOMP_SPINCOUNT"]') < source.index("from pagedserve.")
