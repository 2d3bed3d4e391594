"""Triton kernel that writes the new tokens' K/V into the paged cache.

    key/value [num_tokens, num_kv_heads, head_dim]   (row of one token = num_kv_heads * head_dim)
    k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping[t] = block_id * block_size + offset;  -1 = padding token, skipped

One program per token copies its K row and V row into the cache slot. The launcher reads
only shapes and strides, so it never synchronises with the device (safe under CUDA graphs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
    block_id = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    cols = tl.arange(0, ROW_PAD)
    mask = cols < ROW
    k = tl.load(key_ptr + token * stride_key_token + cols, mask=mask)
    v = tl.load(value_ptr + token * stride_value_token + cols, mask=mask)
    k_dst = k_cache_ptr + block_id * stride_k_cache_block + offset * stride_k_cache_slot + cols
    v_dst = v_cache_ptr + block_id * stride_v_cache_block + offset * stride_v_cache_slot + cols
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


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
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32; got {tensor.dtype}")
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
