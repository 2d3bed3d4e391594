"""Kernel tests run natively on CUDA and through Triton's interpreter on CPU.

TRITON_INTERPRET must be set before triton is first imported; pytest imports this file
before the test modules of this folder, so it is set here when no CUDA device exists."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
