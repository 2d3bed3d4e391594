"""RMSNorm, with the residual add fused in: forward(x, residual) -> (normed, x + residual).
On CUDA one Triton kernel does both (and updates `residual` in place)."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as transformers' LlamaRMSNorm: fp32 statistics, cast back, scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda and x.dim() == 2 and x.stride(1) == 1:   # one fused kernel
            from pagedserve.layers.triton_ops import rms_norm
            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            residual = residual.contiguous()
            return rms_norm(x, self.weight, self.eps, residual), residual
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
