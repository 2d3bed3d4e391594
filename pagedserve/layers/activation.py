"""SiLU(gate) * up over a merged [gate; up] projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x = [gate | up] (a function: callers on the step's path build no module)."""
    if x.is_cuda and x.dim() == 2:
        from pagedserve.layers.triton_ops import silu_and_mul as triton_silu_and_mul
        return triton_silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
