"""Rotary position embedding (neox / rotate-half style, as transformers' Llama), with the
"llama3", "linear" and "yarn" scalings (YaRN: frequencies blended between interpolated and
extrapolated by a ramp over the dimensions, cos/sin scaled by its attention factor). cos/sin are
precomputed for max_position positions."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """On the CPU, as transformers computes it (a GPU pow can differ in the last bit)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if not scaling:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    if scaling["rope_type"] == "yarn":
        return _yarn_inv_freq(head_dim, base, factor, scaling)
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, base: float, factor: float, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN's frequencies, as transformers' _compute_yarn_parameters computes them."""
    original = float(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp   # the high-frequency dimensions keep their frequency
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def attention_factor(scaling: dict[str, Any] | None) -> float:
    """The factor YaRN scales cos / sin by (1 for the other scalings)."""
    if not scaling or scaling["rope_type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor, m, m_all = float(scaling["factor"]), scaling.get("mscale"), scaling.get("mscale_all_dim")
    return float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float,
                 scaling: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.head_dim = head_dim
        # positions x inv_freq and cos/sin on the model's device (the default device at
        # construction), as transformers computes them at run time
        inv_freq = _inv_freq(head_dim, base, scaling).to(torch.get_default_device())
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = attention_factor(scaling)
        self.register_buffer("cos_cache", (emb.cos() * scale).to(dtype), persistent=False)
        self.register_buffer("sin_cache", (emb.sin() * scale).to(dtype), persistent=False)
        self._positions: torch.Tensor | None = None
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def uses_triton(self, query: torch.Tensor) -> bool:
        """Whether the Triton kernels rotate this query (CUDA, a power-of-two head_dim)."""
        return query.is_cuda and self.head_dim & (self.head_dim - 1) == 0

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """query [T, Hq, D], key [T, Hkv, D] -> rotated (on CUDA: in place, one kernel)."""
        if self.uses_triton(query):
            from pagedserve.layers.triton_ops import rotary_in_place
            rotary_in_place(positions, query, key, self.cos_cache, self.sin_cache)
            return query, key
        if positions is not self._positions:   # one gather per step: every layer shares this module
            self._positions = positions
            self._cos_sin = self.cos_cache[positions].unsqueeze(1), self.sin_cache[positions].unsqueeze(1)
        cos, sin = self._cos_sin
        return (query * cos + self._rotate_half(query) * sin,
                key * cos + self._rotate_half(key) * sin)
