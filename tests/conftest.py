"""Shared test fixtures.

TRITON_INTERPRET must be set before triton is first imported: when no CUDA device exists,
the Triton kernels run through Triton's interpreter on CPU (tests/kernels)."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.helpers import write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One tiny random checkpoint (safetensors) per supported architecture, written by
    transformers itself; the same seeds every run."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: write_tiny_checkpoint(str(root / name), name) for name in
            ("llama", "llama3_tied", "mistral", "qwen2", "qwen3")}
