"""The nucleus draw of nucleus.py as one Triton program a row (CUDA): a max / normaliser pass,
then per round a walk of the cumulative mass to the draw and a pass for the mass above it."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.layers.nucleus import ROUNDS

BLOCK = 2048       # vocabulary entries a program reads at a time


@triton.jit
def _top_p_sample_kernel(logits_ptr, stride_row, top_p_ptr, uniform_ptr, out_ptr, vocab,
                         ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    # pass 1: the maximum (and its first index) and Z = sum exp(x - max), online
    m = float("-inf")
    z = 0.0
    best = 0
    for start in range(0, vocab, BLOCK):
        x = tl.load(base + start + offs, mask=start + offs < vocab, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, 0)
        if block_max > m:
            best = start + tl.argmax(x, 0)
        m_new = tl.maximum(m, block_max)
        # masked (-inf) entries add nothing, also while every entry so far is masked (exp(-inf -
        # -inf) is NaN: a top-k mask leaves whole blocks so)
        z = tl.where(m == float("-inf"), 0.0, z * tl.exp(m - m_new)) \
            + tl.sum(tl.where(x > float("-inf"), tl.exp(x - m_new), 0.0), 0)
        m = m_new
    top_p = tl.load(top_p_ptr + row)
    low = float("-inf")   # the candidates: logits above low
    candidates = z        # their mass
    token = best          # the fallback: the argmax is always in the nucleus
    r = 0
    while r < ROUNDS:
        target = tl.load(uniform_ptr + row * ROUNDS + r) * candidates
        # the draw: the first candidate where the running mass reaches target (the last
        # candidate if rounding leaves target above the walk's total)
        running = 0.0
        drawn = -1
        last = -1
        start = 0
        while start < vocab:
            x = tl.load(base + start + offs, mask=start + offs < vocab, other=float("-inf")).to(tl.float32)
            p = tl.where(x > low, tl.exp(x - m), 0.0)
            block_mass = tl.sum(p, 0)
            last = tl.maximum(last, tl.max(tl.where(p > 0.0, start + offs, -1), 0))
            if (running + block_mass >= target) & (block_mass > 0.0):
                reached = running + tl.cumsum(p, 0) >= target
                # (the block's last candidate where its cumsum rounds below its sum)
                drawn = tl.minimum(tl.min(tl.where(reached & (p > 0.0), start + offs, vocab), 0), last)
                start = vocab
            else:
                running += block_mass
                start += BLOCK
        if drawn < 0:
            drawn = last
        if drawn < 0:   # no candidate at all (every entry -inf): the argmax
            r = ROUNDS
        else:
            x_drawn = tl.load(base + drawn).to(tl.float32)
            # the mass strictly above the drawn token's logit
            above = 0.0
            for start2 in range(0, vocab, BLOCK):
                x = tl.load(base + start2 + offs, mask=start2 + offs < vocab, other=float("-inf")).to(tl.float32)
                above += tl.sum(tl.where(x > x_drawn, tl.exp(x - m), 0.0), 0)
            if above < top_p * z:
                token = drawn
                r = ROUNDS
            else:
                low = x_drawn
                candidates = above
                r += 1
    tl.store(out_ptr + row, token.to(tl.int64))


def sample_top_p(logits: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token id a row of `logits` (float32 [rows, vocab], unit column stride: temperature
    and masks applied; -inf entries are never drawn, a row of -inf gives its argmax), from its
    top-p nucleus (top_p float32 [rows]; 1 keeps every token), drawn with `uniforms` (float32
    [rows, ROUNDS] in [0, 1): nucleus.draw_uniforms)."""
    rows, vocab = logits.shape
    if logits.dtype != torch.float32 or logits.stride(1) != 1 or top_p.shape != (rows,) \
            or uniforms.shape != (rows, ROUNDS) or not uniforms.is_contiguous():
        raise ValueError(f"sample_top_p: need float32 [rows, vocab] logits with unit column stride, top_p [rows] and "
                         f"uniforms [rows, {ROUNDS}]; got {logits.dtype} {tuple(logits.shape)} strides "
                         f"{logits.stride()}, {tuple(top_p.shape)}, {tuple(uniforms.shape)}")
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        _top_p_sample_kernel[(rows,)](logits, logits.stride(0), top_p.to(torch.float32).contiguous(), uniforms, out,
                                      vocab, ROUNDS=ROUNDS, BLOCK=BLOCK, num_warps=8)
    return out
