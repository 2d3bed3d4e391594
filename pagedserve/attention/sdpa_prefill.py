"""Long prefill chunks through torch's fused SDPA (cuDNN on CUDA), one sequence at a time.

A chunk of L new tokens after C cached ones is two attentions merged by their log-sum-exp:

    new part      q x K/V of the chunk itself (contiguous, this step's key/value), causal (L == S,
                  so torch's top-left causal mask is the right one)
    context part  q x K/V of the C cached tokens, gathered out of the paged cache into a
                  contiguous copy (cheap: one index_select per layer), no mask

    out = (o_new * exp(lse_new) + o_ctx * exp(lse_ctx)) / (exp(lse_new) + exp(lse_ctx))

(`_merge_kernel`, one pass). Needs host copies of query_start_loc / seq_lens, so it runs in
eager steps only; CUDA-graph steps keep the Triton kernels. `sdpa_with_lse` is the seam: on
CUDA the cuDNN op, elsewhere (tests) torch's math attention with the same contract.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(out_ptr, o1_ptr, o2_ptr, lse1_ptr, lse2_ptr, num_rows,
                  stride_out_t, stride_out_h, stride_o1_t, stride_o1_h, stride_o2_t, stride_o2_h,
                  stride_lse1_h, stride_lse2_h,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """out[t, h] = the softmax-weighted mix of o1[t, h] and o2[t, h] by their natural-log LSEs."""
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_valid = rows < num_rows
    mask = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    lse1 = tl.load(lse1_ptr + head * stride_lse1_h + rows, mask=row_valid, other=0.0) * 1.4426950408889634
    lse2 = tl.load(lse2_ptr + head * stride_lse2_h + rows, mask=row_valid, other=0.0) * 1.4426950408889634
    m = tl.maximum(lse1, lse2)
    w1 = tl.math.exp2(lse1 - m)
    w2 = tl.math.exp2(lse2 - m)
    total = w1 + w2
    rows64 = rows.to(tl.int64)
    o1 = tl.load(o1_ptr + rows64[:, None] * stride_o1_t + head * stride_o1_h + offs_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    o2 = tl.load(o2_ptr + rows64[:, None] * stride_o2_t + head * stride_o2_h + offs_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    out = (o1 * (w1 / total)[:, None] + o2 * (w2 / total)[:, None])
    tl.store(out_ptr + rows64[:, None] * stride_out_t + head * stride_out_h + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


def merge_by_lse(out: torch.Tensor, o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
                 lse2: torch.Tensor) -> None:
    """out, o1, o2: [L, H, D] (any token/head strides, contiguous D); lse1, lse2: [H, L] fp32 with
    a contiguous L (natural log). Writes out."""
    num_rows, num_heads, head_dim = out.shape
    block_t = 32
    _merge_kernel[(triton.cdiv(num_rows, block_t), num_heads)](
        out, o1, o2, lse1, lse2, num_rows,
        out.stride(0), out.stride(1), o1.stride(0), o1.stride(1), o2.stride(0), o2.stride(1),
        lse1.stride(0), lse2.stride(0),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_T=block_t, num_warps=4)


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [1, Hq, L, D], k/v [1, Hkv, S, D] (Hkv divides Hq) -> (out [1, Hq, L, D], lse [Hq, L] fp32,
    natural log). CUDA: torch's cuDNN attention (GQA native); elsewhere: math, for tests."""
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
        return out, lse.reshape(q.shape[1], q.shape[2])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1).float(), v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("bhld,bhsd->bhls", q.float(), k) * scale
    if causal:
        length, keys = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(length, keys, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhls,bhsd->bhld", torch.exp(scores - lse[..., None]), v)
    return out.to(q.dtype), lse[0]


def gather_context(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table_row: torch.Tensor,
                   context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first context_len cached K and V rows of one sequence, [context_len, Hkv, D] each,
    copied contiguous (one index_select per cache)."""
    blocks = block_table_row[:-(-context_len // k_cache.shape[1])]
    return (k_cache.index_select(0, blocks).flatten(0, 1)[:context_len],
            v_cache.index_select(0, blocks).flatten(0, 1)[:context_len])


def sdpa_prefill_sequence(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, block_table_row: torch.Tensor,
                          token_begin: int, query_len: int, context_len: int, scale: float,
                          out: torch.Tensor) -> None:
    """Attention of one sequence's chunk (tokens [token_begin, token_begin + query_len) of
    query/key/value [T, H, D]) after context_len cached tokens (read through block_table_row);
    writes out[token_begin:token_begin + query_len]."""
    end = token_begin + query_len
    q = query[token_begin:end].transpose(0, 1).unsqueeze(0)
    o_new, lse_new = sdpa_with_lse(q, key[token_begin:end].transpose(0, 1).unsqueeze(0),
                                   value[token_begin:end].transpose(0, 1).unsqueeze(0), True, scale)
    target = out[token_begin:end]
    if context_len == 0:
        target.copy_(o_new[0].transpose(0, 1))
        return
    k_ctx, v_ctx = gather_context(k_cache, v_cache, block_table_row, context_len)
    if k_ctx.dtype != q.dtype:   # an FP8 cache (kv_cache_dtype)
        k_ctx, v_ctx = k_ctx.to(q.dtype), v_ctx.to(q.dtype)
    o_ctx, lse_ctx = sdpa_with_lse(q, k_ctx.transpose(0, 1).unsqueeze(0), v_ctx.transpose(0, 1).unsqueeze(0),
                                   False, scale)
    merge_by_lse(target, o_new[0].transpose(0, 1), lse_new.contiguous(), o_ctx[0].transpose(0, 1),
                 lse_ctx.contiguous())


def sdpa_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """cuDNN fused attention: CUDA, 16-bit types, head_dim a multiple of 8 up to 128."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0
            and head_dim <= 128 and torch.backends.cudnn.is_available()
            and torch.backends.cuda.cudnn_sdp_enabled())
