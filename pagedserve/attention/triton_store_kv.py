"""Triton kernel that writes the new tokens' K/V into the paged cache.

    key/value [num_tokens, num_kv_heads, head_dim]   (row of one token = num_kv_heads * head_dim)
    k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping[t] = block_id * block_size + offset;  -1 = padding token, skipped

One program per token copies its K row and V row into the cache slot. The launcher reads
only shapes and strides, so it never synchronises with the device (safe under CUDA graphs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedserve.attention.torch_ref import FP8_MAX
from pagedserve.layers.triton_ops import _LIBDEVICE, rotate

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CACHE_DTYPES = _FLOAT_DTYPES + tuple(FP8_MAX)   # kv_cache_dtype fp8: one byte a value


@triton.jit
def fp8_operands(q, k, v):
    """The dot operands over an FP8 cache's k / v tile: fp32 for an fp32 query; else all three
    fp16. FP8 converts to fp16 exactly, one instruction a pair; K / V converted to a bf16 query's
    dtype instead took thr512 llama-8b from 9.39k to 8.50k out tok/s on an H200 (benchmarks/RESULTS.md)."""
    if q.dtype == tl.float32:   # a compile-time branch: one return (Triton 3.6 checks every return's types)
        k, v = k.to(tl.float32), v.to(tl.float32)
    else:
        q, k, v = q.to(tl.float16), k.to(tl.float16), v.to(tl.float16)
    return q, k, v


@triton.jit
def to_cache(x, cache_ptr):
    """x in the cache's element type; an FP8 cache saturates at its largest finite value (E4M3
    +-448, E5M2 +-57344; torch_ref.to_cache), never NaN or inf."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        x = tl.clamp(x.to(tl.float32), -448.0, 448.0)
    elif cache_ptr.dtype.element_ty == tl.float8e5:
        x = tl.clamp(x.to(tl.float32), -57344.0, 57344.0)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def slot_row(cache_ptr, slot, stride_block, stride_slot, BLOCK_SIZE: tl.constexpr):
    """The start of cache slot `slot` (int64; block slot // BLOCK_SIZE, row slot % BLOCK_SIZE)."""
    return cache_ptr + (slot // BLOCK_SIZE) * stride_block + (slot % BLOCK_SIZE) * stride_slot


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_key_token, stride_value_token,
    stride_k_cache_block, stride_k_cache_slot,
    stride_v_cache_block, stride_v_cache_slot,
    BLOCK_SIZE: tl.constexpr,  # cache slots per block
    ROW: tl.constexpr,  # num_kv_heads * head_dim
    ROW_PAD: tl.constexpr,  # next power of two >= ROW
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    cols = tl.arange(0, ROW_PAD)
    mask = cols < ROW
    k = tl.load(key_ptr + token * stride_key_token + cols, mask=mask)
    v = tl.load(value_ptr + token * stride_value_token + cols, mask=mask)
    k_dst = slot_row(k_cache_ptr, slot, stride_k_cache_block, stride_k_cache_slot, BLOCK_SIZE) + cols
    v_dst = slot_row(v_cache_ptr, slot, stride_v_cache_block, stride_v_cache_slot, BLOCK_SIZE) + cols
    tl.store(k_dst, to_cache(k, k_cache_ptr), mask=mask)
    tl.store(v_dst, to_cache(v, v_cache_ptr), mask=mask)


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr, key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_q_token, stride_q_head, stride_key_token, stride_value_token,
    stride_k_cache_block, stride_k_cache_slot, stride_v_cache_block, stride_v_cache_slot, stride_cos,
    num_q_heads, num_kv_heads, q_out_ptr, stride_qo_token, stride_qo_head, sq_ptr, inv_k, eps,
    BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, LIBDEVICE: tl.constexpr,
    SCALED: tl.constexpr = False,
):
    """Rotary on the token's query and key heads (in place, as _rotary_kernel in
    layers/triton_ops.py, with its rounding), then the key and value rows into the cache slot
    (as _store_kv_kernel). SCALED: q / k / v are a W4A16 norm launch's fp32 hand-off, each
    token's row first scaled by rsqrt(sq[token] * inv_k + eps) (the norm's statistic); the
    rotated query goes to q_out (its dtype) and the key is not written back."""
    token = tl.program_id(0).to(tl.int64)
    row_scale = 1.0
    if SCALED:
        row_scale = tl.rsqrt(tl.load(sq_ptr + token) * inv_k + eps)
    pos = tl.load(pos_ptr + token)
    offs = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * stride_cos + offs).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + offs).to(tl.float32)[None, :]
    heads = tl.arange(0, BLOCK_H)
    q = q_ptr + token * stride_q_token + heads[:, None] * stride_q_head + offs[None, :]
    q_mask = heads[:, None] < num_q_heads
    q1, q2 = tl.load(q, mask=q_mask, other=0.0), tl.load(q + HALF, mask=q_mask, other=0.0)
    if SCALED:
        q1, q2 = q1 * row_scale, q2 * row_scale
        q = q_out_ptr + token * stride_qo_token + heads[:, None] * stride_qo_head + offs[None, :]
    q1, q2 = rotate(q1, q2, cos, sin, LIBDEVICE)
    tl.store(q, q1.to(q.dtype.element_ty), mask=q_mask)
    tl.store(q + HALF, q2.to(q.dtype.element_ty), mask=q_mask)
    row = heads[:, None] * (2 * HALF) + offs[None, :]   # [num_kv_heads, head_dim] rows are contiguous
    kv_mask = heads[:, None] < num_kv_heads
    k = key_ptr + token * stride_key_token + row
    k1, k2 = tl.load(k, mask=kv_mask, other=0.0), tl.load(k + HALF, mask=kv_mask, other=0.0)
    if SCALED:
        k1, k2 = rotate(k1 * row_scale, k2 * row_scale, cos, sin, LIBDEVICE)
    else:
        k1, k2 = rotate(k1, k2, cos, sin, LIBDEVICE)
        tl.store(k, k1, mask=kv_mask)
        tl.store(k + HALF, k2, mask=kv_mask)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    k_dst = slot_row(k_cache_ptr, slot, stride_k_cache_block, stride_k_cache_slot, BLOCK_SIZE) + row
    tl.store(k_dst, to_cache(k1, k_cache_ptr), mask=kv_mask)
    tl.store(k_dst + HALF, to_cache(k2, k_cache_ptr), mask=kv_mask)
    v_dst = slot_row(v_cache_ptr, slot, stride_v_cache_block, stride_v_cache_slot, BLOCK_SIZE) + row
    for half in tl.static_range(2):
        v = tl.load(value_ptr + token * stride_value_token + row + half * HALF, mask=kv_mask)
        if SCALED:
            v = v * row_scale
        tl.store(v_dst + half * HALF, to_cache(v, v_cache_ptr), mask=kv_mask)


def _check_rows_contiguous(name: str, tensor: torch.Tensor) -> None:
    """The last two dims [num_kv_heads, head_dim] must form one contiguous row."""
    if tensor.stride(-1) != 1 or tensor.stride(-2) != tensor.shape[-1]:
        raise ValueError(f"{name} must be contiguous over its last two dims "
                         f"(got shape {tuple(tensor.shape)}, strides {tensor.stride()})")


def _check_store_inputs(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"key and value must both be [num_tokens, num_kv_heads, head_dim]; "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, "
                         f"head_dim]; got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"key [.., num_kv_heads, head_dim] = {tuple(key.shape[1:])} does not match "
                         f"the cache's {tuple(k_cache.shape[2:])}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must be [num_tokens={key.shape[0]}]; got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64; got {slot_mapping.dtype}")
    for name, tensor in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        if tensor.dtype not in (CACHE_DTYPES if name.endswith("cache") else _FLOAT_DTYPES):
            raise ValueError(f"{name} must be float16, bfloat16 or float32 (a cache also FP8); got {tensor.dtype}")
        if tensor.device != key.device:
            raise ValueError(f"{name} is on {tensor.device}, key is on {key.device}")
        _check_rows_contiguous(name, tensor)
    slot_row = k_cache.shape[2] * k_cache.shape[3]
    if k_cache.stride(1) != slot_row or v_cache.stride(1) != slot_row:
        raise ValueError("k_cache/v_cache slots must be contiguous [num_kv_heads, head_dim] rows")
    if slot_mapping.device != key.device or slot_mapping.stride(0) != 1:
        raise ValueError("slot_mapping must be a contiguous tensor on the same device as key")


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into k_cache/v_cache at
    `slot_mapping` ([num_tokens], int32/int64). Slots of -1 are skipped.

    Mutates k_cache and v_cache in place (only the addressed slots); key/value may be views
    with any token stride (e.g. slices of a fused qkv projection) and are cast to the cache
    dtype. Slot values are not range-checked (that would need a device sync): callers own
    `0 <= slot < num_blocks * block_size` for every non-padding token.
    """
    _check_store_inputs(key, value, k_cache, v_cache, slot_mapping)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    row = key.shape[1] * key.shape[2]
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), value.stride(0),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        BLOCK_SIZE=k_cache.shape[1], ROW=row, ROW_PAD=triton.next_power_of_2(row),
        num_warps=4 if row <= 2048 else 8,
    )


def rotary_store_kv(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    cos_cache: torch.Tensor, sin_cache: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    unnormed: tuple[torch.Tensor, torch.Tensor, float, float] | None = None) -> torch.Tensor:
    """Rotary embedding of query [T, Hq, D] (in place) and key [T, Hkv, D] at `positions`
    (cos/sin caches [max_position, D], halves duplicated: layers/rotary.py), then store_kv of
    the rotated key and value: one launch for what rotary_in_place + store_kv do in two, with
    the same results (query and key rotated in place, the cache written). Returns the rotated
    query. `unnormed` = (query out, squares [T], 1 / K, eps): q / k / v are a W4A16 norm
    launch's fp32 hand-off (w4a16_handoff.py), each token's row scaled by rsqrt(squares * 1 / K
    + eps) first; the rotated query goes to `query out` (returned), the key is left as it is."""
    _check_store_inputs(key, value, k_cache, v_cache, slot_mapping)
    head_dim = key.shape[-1]
    q_out, squares, inv_k, eps = unnormed or (query, query, 0.0, 0.0)
    if query.dim() != 3 or query.shape[0] != key.shape[0] or query.shape[-1] != head_dim or query.stride(2) != 1 \
            or head_dim & (head_dim - 1) or query.dtype != key.dtype or q_out.shape != query.shape \
            or q_out.stride(2) != 1:
        raise ValueError(f"rotary_store_kv: query must be [T, Hq, D] of key's dtype with unit stride on a "
                         f"power-of-two D; got {tuple(query.shape)} {query.dtype}, key {tuple(key.shape)}")
    if cos_cache.shape[-1] != head_dim or sin_cache.stride() != cos_cache.stride() \
            or positions.shape != (key.shape[0],):
        raise ValueError("rotary_store_kv: cos/sin cache or positions do not match the query")
    if key.shape[0] == 0:
        return q_out
    _rotary_store_kv_kernel[(key.shape[0],)](
        query, key, value, k_cache, v_cache, slot_mapping, positions, cos_cache, sin_cache,
        query.stride(0), query.stride(1), key.stride(0), value.stride(0),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), cos_cache.stride(0),
        query.shape[1], key.shape[1], q_out, q_out.stride(0), q_out.stride(1), squares, inv_k, eps,
        BLOCK_SIZE=k_cache.shape[1], HALF=head_dim // 2,
        BLOCK_H=triton.next_power_of_2(max(query.shape[1], key.shape[1])), LIBDEVICE=_LIBDEVICE,
        SCALED=unnormed is not None, num_warps=4)
    return q_out


@dataclass(frozen=True)
class RotaryStore:
    """What rotary_store_kv takes besides the query and the cache, for paged_attention to do its
    work in the decode launch: key / value [T, Hkv, D] (this step's, unrotated; views with
    contiguous [Hkv, D] rows), slot_mapping [T] (-1: not stored), and the [max_position, D]
    cos / sin caches with duplicated halves (layers/rotary.py). No positions: in a decode launch
    token s is at position seq_lens[s] - 1 (the positions input_batch builds)."""

    key: torch.Tensor
    value: torch.Tensor
    slot_mapping: torch.Tensor
    cos_cache: torch.Tensor
    sin_cache: torch.Tensor

    def check(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, max_query_len: int | None,
              num_decodes: int | None, num_seqs: int) -> None:
        _check_store_inputs(self.key, self.value, k_cache, v_cache, self.slot_mapping)
        head_dim = query.shape[2]
        if max_query_len != 1 or num_decodes != num_seqs:
            raise ValueError(f"rotary_store needs an all-decode batch (max_query_len 1, num_decodes = num_seqs); "
                             f"got max_query_len={max_query_len}, num_decodes={num_decodes}, num_seqs={num_seqs}")
        if head_dim & (head_dim - 1) or self.key.shape[0] != query.shape[0] or self.cos_cache.shape[-1] != head_dim \
                or self.cos_cache.dim() != 2 or self.sin_cache.stride() != self.cos_cache.stride() \
                or self.cos_cache.stride(1) != 1 or self.key.dtype != query.dtype:
            raise ValueError(f"rotary_store: a power-of-two head_dim, key [T, Hkv, D] of the query's dtype "
                             f"and cos / sin [max_position, D] needed; got query {tuple(query.shape)}, key "
                             f"{tuple(self.key.shape)} {self.key.dtype}, cos {tuple(self.cos_cache.shape)}")
