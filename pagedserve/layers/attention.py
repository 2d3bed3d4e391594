"""The attention layer: store this step's K/V into the layer's paged cache, then attend
through the block tables with the backend chosen at start-up (torch reference on CPU,
Triton kernels on GPU)."""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.attention.backend import AttentionBackend
from pagedserve.attention.metadata import AttentionMetadata
from pagedserve.layers.linear_ops import decode_fusion, fuses
from pagedserve.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        # Bound by the model runner once the cache is allocated.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.backend: AttentionBackend | None = None
        # An FP8 checkpoint's KV scales (k_scale / v_scale, set_kv_scales): an FP8 cache holds K / k_scale
        # and V / v_scale; ignored with a cache of the model's dtype (as vLLM)
        self.k_scale = self.v_scale = 1.0

    def set_kv_scales(self, k_scale: float | None = None, v_scale: float | None = None) -> None:
        for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
            if value is not None:
                if not (value > 0 and value < float("inf")):
                    raise ValueError(f"the checkpoint's {name} must be a positive finite number, got {value}")
                setattr(self, name, float(value))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                rotary: tuple[RotaryEmbedding, torch.Tensor] | None = None,
                unnormed: tuple[torch.Tensor, float, float, torch.dtype] | None = None) -> torch.Tensor:
        """q [T, Hq*D], k/v [T, Hkv*D] -> [T, Hq*D]; mutates this layer's KV cache. With
        `rotary` (the embedding and the positions) q and k are rotated first; on the Triton backend
        an all-decode step (up to TritonBackend.fused_decode_max_seqs rows) rotates, stores and
        attends in one launch, other decode-sized batches rotate in the KV store's launch (q in place). `unnormed` =
        (squares [T], 1 / K, eps, dtype): q / k / v are a W4A16 norm launch's fp32 hand-off
        (layers/quantization/w4a16_handoff.py), scaled here by the norm's rsqrt and taken to
        `dtype` (in the KV store's launch where it rotates)."""
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        assert self.backend is not None, "KV cache not bound"
        scale, v_scale = self.scale, None
        if (self.k_scale != 1.0 or self.v_scale != 1.0) and self.k_cache.element_size() == 1:
            # the cache holds K / k_scale and V / v_scale (rotary is linear: the rotated key's too);
            # scores take k_scale in the softmax scale, the output v_scale
            k, v = k * (1.0 / self.k_scale), v * (1.0 / self.v_scale)
            scale, v_scale = self.scale * self.k_scale, self.v_scale
        out = self._attend(q, k, v, meta, scale, rotary, unnormed)
        return out if v_scale is None else out.mul_(v_scale)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float,
                rotary: tuple[RotaryEmbedding, torch.Tensor] | None,
                unnormed: tuple[torch.Tensor, float, float, torch.dtype] | None) -> torch.Tensor:
        num_tokens = q.shape[0]
        triton_rotary = rotary is not None and self.backend.name == "triton" and rotary[0].uses_triton(q)
        if triton_rotary and unnormed is None and decode_fusion() and \
                (out := self.backend.decode(q, k, v, self.k_cache, self.v_cache, meta, scale, rotary)) is not None:
            return out   # all decodes (up to the backend's fused_decode_max_seqs rows, past the gemv's)
        if triton_rotary and fuses(q):   # few rows: rotary and the KV store in one launch
            from pagedserve.attention.triton_store_kv import rotary_store_kv
            rope, positions = rotary
            if unnormed is not None:
                squares, inv_k, eps, dtype = unnormed
                unnormed = (torch.empty(q.shape, dtype=dtype, device=q.device), squares, inv_k, eps)
            q = rotary_store_kv(positions, q, k, v, rope.cos_cache, rope.sin_cache, self.k_cache, self.v_cache,
                                meta.slot_mapping, unnormed)
        else:
            if unnormed is not None:
                squares, inv_k, eps, dtype = unnormed
                rsqrt = torch.rsqrt(squares * inv_k + eps)[:, None, None]
                q, k, v = ((t * rsqrt).to(dtype) for t in (q, k, v))
            if rotary is not None and self.backend.name == "torch" and \
                    (out := self.backend.decode(q, k, v, self.k_cache, self.v_cache, meta, scale, rotary)) is not None:
                return out   # one C++ call (GGUF packed on CPU)
            if rotary is not None:
                q, k = rotary[0](rotary[1], q, k)
            self.backend.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping, meta)
        out = self.backend.attend(q, k, v, self.k_cache, self.v_cache, meta, scale)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
