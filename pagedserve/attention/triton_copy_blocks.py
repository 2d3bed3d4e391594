"""Triton kernel that copies whole KV blocks between two caches of the same layout, in one
launch for any number of blocks and layers (the host tier's swaps: device -> host and host
-> device, the host side through a CUDA view of pinned memory).

    src [planes, num_src_blocks, words], dst [planes, num_dst_blocks, words]
    (planes = 2 * num_layers: K and V of each layer; words = one block of one plane)
    dst[:, dst_ids[i]] = src[:, src_ids[i]] for every pair i

One program per (pair, plane, chunk of words). The launcher checks shapes, dtypes and strides
only, so it never synchronises with the device. Destination ids must be distinct (programs
run in any order).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 1024   # words per program


@triton.jit
def _copy_blocks_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr,
                        src_plane_stride, src_block_stride, dst_plane_stride, dst_block_stride,
                        words, CHUNK: tl.constexpr):
    pair = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    offsets = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    mask = offsets < words
    src_block = tl.load(src_ids_ptr + pair).to(tl.int64)
    dst_block = tl.load(dst_ids_ptr + pair).to(tl.int64)
    values = tl.load(src_ptr + plane * src_plane_stride + src_block * src_block_stride + offsets, mask=mask)
    tl.store(dst_ptr + plane * dst_plane_stride + dst_block * dst_block_stride + offsets, values, mask=mask)


def _check(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    if src.dim() != 3 or dst.dim() != 3:
        raise ValueError(f"src and dst must be [planes, num_blocks, words]; got {tuple(src.shape)} and "
                         f"{tuple(dst.shape)}")
    if src.shape[0] != dst.shape[0] or src.shape[2] != dst.shape[2]:
        raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} differ in planes or words")
    if src.dtype != dst.dtype:
        raise ValueError(f"src is {src.dtype}, dst is {dst.dtype}")
    if src.stride(2) != 1 or dst.stride(2) != 1:
        raise ValueError("each block's words must be contiguous in src and dst")
    if src_ids.shape != dst_ids.shape or src_ids.dim() != 1:
        raise ValueError(f"src_ids {tuple(src_ids.shape)} and dst_ids {tuple(dst_ids.shape)} must be equal 1-d")
    for name, ids in (("src_ids", src_ids), ("dst_ids", dst_ids)):
        if ids.dtype not in (torch.int32, torch.int64) or (ids.stride(0) != 1 and ids.numel() > 1):
            raise ValueError(f"{name} must be a contiguous int32/int64 tensor")
        if ids.device != src.device or ids.device != dst.device:
            raise ValueError(f"{name} ({ids.device}), src ({src.device}) and dst ({dst.device}) must share a "
                             "device (the host side as a CUDA view)")


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """dst[:, dst_ids[i]] = src[:, src_ids[i]] for each i, in one launch on the current stream.
    Mutates dst only. Ids are not range-checked (that would need a device sync): the caller
    owns them."""
    _check(src, dst, src_ids, dst_ids)
    num_pairs, planes, words = src_ids.shape[0], src.shape[0], src.shape[2]
    if num_pairs == 0:
        return
    _copy_blocks_kernel[(num_pairs, planes, triton.cdiv(words, CHUNK))](
        src, dst, src_ids, dst_ids, src.stride(0), src.stride(1), dst.stride(0), dst.stride(1), words,
        CHUNK=CHUNK, num_warps=4)
