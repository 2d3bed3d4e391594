"""Merging the split-K partials of the decode attention (triton_paged_attention.py): each of a
token's active segments wrote an un-normalised (acc, running max, running sum) in fp32; their
online merge in the log2 domain (merge_group) gives the token's output. Either the attention
launch itself (MERGE_IN_KERNEL: the last segment of a token's KV-head group to finish, by an
arrival counter per (token, KV head) that it resets, merges the group's heads at once) or the
reduce launch after it (reduce_segments: a program per (token, head), a group of one)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def merge_group(out_ptr, stride_o_head, partial_acc_ptr, partial_max_ptr, partial_sum_ptr, first_row, num_valid,
                 num_segments, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HEAD_DIM_PAD: tl.constexpr, SEG_CHUNK: tl.constexpr):
    """The outputs of GROUP consecutive heads of one token (head h's at out_ptr + h * stride_o_head)
    from their split-K partials (head h's at rows first_row + h * num_segments + [0, num_valid);
    rows past num_valid count as empty: max -inf, sum 0, acc 0), merged SEG_CHUNK segments at a
    time, online, the group's loads in flight together."""
    offs_h = tl.arange(0, GROUP_PAD)
    offs_s = tl.arange(0, SEG_CHUNK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    h_valid = offs_h < GROUP
    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    total = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    for start in range(0, num_valid, SEG_CHUNK):
        valid = h_valid[:, None] & (start + offs_s < num_valid)[None, :]
        row = first_row + offs_h[:, None] * num_segments + start + offs_s[None, :]
        seg_max = tl.load(partial_max_ptr + row, mask=valid, other=float("-inf"), cache_modifier=".cg")
        seg_sum = tl.load(partial_sum_ptr + row, mask=valid, other=0.0, cache_modifier=".cg")
        seg_acc = tl.load(partial_acc_ptr + row[:, :, None] * HEAD_DIM_PAD + offs_d[None, None, :],
                          mask=valid[:, :, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(seg_max, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        weight = tl.math.exp2(seg_max - m_safe[:, None])
        total = total * alpha + tl.sum(seg_sum * weight, 1)
        acc = acc * alpha[:, None] + tl.sum(seg_acc * weight[:, :, None], 1)
        m = m_new
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(out_ptr + offs_h[:, None] * stride_o_head + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=h_valid[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=["num_seqs", "num_segments"])
def _reduce_segments_kernel(
    out_ptr, partial_acc_ptr, partial_max_ptr, partial_sum_ptr, active_ptr, query_start_loc_ptr, num_seqs,
    num_segments, stride_o_token, stride_o_head,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    SEG_CHUNK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if (token < tl.load(query_start_loc_ptr)) | (token >= tl.load(query_start_loc_ptr + num_seqs)):
        return  # padding token (e.g. CUDA-graph batch padding): left untouched
    # the attention kernel's count for this token, kept in range: in a compile-ahead dry run
    # (worker/compile_ahead.py) an attention launch not yet compiled is skipped while this
    # kernel, compiled, runs on the never-written counts (an illegal address on the H200)
    active = tl.minimum(tl.load(active_ptr + token), num_segments)
    if active <= 1:
        return  # its one segment wrote `out`
    merge_group(out_ptr + token * stride_o_token + head * stride_o_head, stride_o_head, partial_acc_ptr,
                partial_max_ptr, partial_sum_ptr, (token * NUM_HEADS + head) * num_segments, active, num_segments,
                1, 1, HEAD_DIM, HEAD_DIM_PAD, SEG_CHUNK)


def reduce_segments(out: torch.Tensor, partials: tuple[torch.Tensor, ...], query_start_loc: torch.Tensor,
                     num_splits: int) -> None:
    """Merge the split-K partials of every real token with more than one active segment into
    `out` (mutated in place)."""
    num_tokens, num_heads, head_dim = out.shape
    _reduce_segments_kernel[(num_tokens, num_heads)](
        out, *partials, query_start_loc, query_start_loc.shape[0] - 1,
        num_splits, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
        SEG_CHUNK=16,
        num_warps=4,
    )


_ARRIVALS: dict[torch.device, torch.Tensor] = {}
_ARRIVAL_COUNT = 1 << 16


def arrivals(device: torch.device, needed: int) -> torch.Tensor | None:
    """Arrival counters of the in-kernel merge ([token, KV head], each reset to 0 by its last
    segment), allocated by a device's first such launch outside CUDA graph capture (None until
    then, or when `needed` does not fit: the launch is merged by the reduce kernel)."""
    if device not in _ARRIVALS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _ARRIVALS[device] = torch.zeros(_ARRIVAL_COUNT, dtype=torch.int32, device=device)
    return _ARRIVALS[device] if needed <= _ARRIVAL_COUNT else None
