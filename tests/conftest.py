"""Shared test fixtures.

TRITON_INTERPRET must be set before triton is first imported: when no CUDA device exists,
the Triton kernels run through Triton's interpreter on CPU (tests/kernels)."""
from __future__ import annotations

import os
import types

if not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ):   # as pagedserve/__init__.py, before torch
    os.environ["GOMP_SPINCOUNT"] = "2000"   # loads libgomp: a busy CI machine must not stall every barrier

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton >= 3.9 warns that FP fusion's default (on, as in the GPU image's 3.6) will change: the kernels'
# bit-for-bit tests assume it on, so say so (the sm_90 compile checks inherit it)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

from tests.helpers import write_tiny_checkpoint  # noqa: E402


def _triton_language() -> list:
    try:
        import triton.language as tl
    except ImportError:
        return []
    return [tl, tl.core, tl.math, tl.tensor, tl.core.tensor_descriptor_base]


_PRISTINE = [(ns, dict(vars(ns))) for ns in _triton_language()]


@pytest.fixture(autouse=True)
def _triton_language_restored():
    """Triton 3.9's interpreter patches triton.language.core for a @triton.jit helper called
    inside a kernel (tl.max, tl.sum, ...: InterpretedFunction.__call__) and never restores it;
    a JITFunction compiled later in the process then traces the interpreter's ops and fails
    (tests/unit/test_compile_ahead_cpu.py after tests/kernels/test_argmax.py). Each test
    ends with triton.language as it was imported."""
    yield
    for ns, pristine in _PRISTINE:
        now = vars(ns)
        for name in [n for n, v in now.items() if n not in pristine and not isinstance(v, types.ModuleType)]:
            delattr(ns, name)   # a submodule imported since stays
        for name, value in pristine.items():
            if now.get(name) is not value:
                setattr(ns, name, value)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One tiny random checkpoint (safetensors) per supported architecture, written by
    transformers itself; the same seeds every run."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: write_tiny_checkpoint(str(root / name), name) for name in
            ("llama", "llama3_tied", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen3_moe",
             "qwen2_moe", "qwen2_yarn")}
