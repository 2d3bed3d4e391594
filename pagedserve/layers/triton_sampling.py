"""Sampling from the top-p nucleus without sorting the vocabulary (CUDA, Triton).

The sort-based path (sampler.apply_top_k_top_p: sort, softmax, cumsum, scatter back, then the
exponential race) sorts every row's whole vocabulary: at 512 rows of Llama-3's 128k it cost
12.6 ms a decode step on an H100, three llama-1b forwards (benchmarks/sampler_gpu.py).

Here one program a row draws by rejection, as FlashInfer's top-p sampler does:
1. one pass for the row's maximum and its softmax normaliser Z (online);
2. a draw from the candidates (tokens whose logit is above `low`, at first all) by walking the
   row's cumulative mass in vocabulary order to a uniform point of it (inverse CDF);
3. one pass for the mass strictly above the drawn token's logit: below top_p * Z, the token is in
   the nucleus (the sort-based rule keeps token t iff the mass of the tokens above it is under
   top_p) and is the sample; otherwise every token at or below it is dropped (low = its logit:
   none of them is in the nucleus either) and the draw is made again from the rest.
A draw conditioned on the candidates, accepted only inside the nucleus (a subset of every
candidate set), is a draw from the nucleus renormalised: the distribution the sort-based path
samples. With top_p 0.95 nearly every first draw is accepted: ~2.5 passes over the row. After
ROUNDS rejections (never seen but at tiny top_p over a flat row) the row's argmax, always in the
nucleus, is taken. Ties: tokens of one logit are kept or dropped together (the sort-based path
splits them in its sort's order); sums are fp32 in vocabulary order, so a token whose mass above
lies within rounding of top_p * Z may be judged otherwise than a sorted cumulative sum would.

top_k runs first as a mask (the k-th largest logit from torch.topk; ties at it kept, as
transformers' warper), so top-p is judged on the top-k tokens renormalised, as in the sort-based
path. The uniforms come from the caller: a seeded row's from its own generator (ROUNDS a step),
so its draws do not depend on the batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ROUNDS = 32        # draws a row at most
BLOCK = 2048       # vocabulary entries a program reads at a time
MAX_TOP_K = 4096   # a larger top_k: the sort-based path (torch.topk's cost grows with k)


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


def top_k_mask(logits: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """logits with every entry below its row's k-th largest set to -inf (ties at the k-th kept,
    as transformers' TopKLogitsWarper); rows whose k is the vocabulary size (off) unchanged.
    `max_k`: the largest k below the vocabulary size (the caller knows it on the host)."""
    vocab = logits.shape[1]
    kth = logits.topk(max_k, dim=-1).values.gather(1, (top_k.clamp(max=max_k) - 1)[:, None])
    kth = torch.where(top_k[:, None] >= vocab, float("-inf"), kth)
    return logits.masked_fill(logits < kth, float("-inf"))


def sample_top_p(logits: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token id a row of `logits` (float32 [rows, vocab], unit column stride: temperature
    and masks applied; -inf entries are never drawn, and every row has a finite one), from its
    top-p nucleus (top_p float32 [rows]; 1 keeps every token), drawn with `uniforms` (float32
    [rows, ROUNDS] in [0, 1))."""
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


def draw_uniforms(rows: int, generators: dict[int, torch.Generator], device: torch.device) -> torch.Tensor:
    """[rows, ROUNDS] uniforms in [0, 1): a seeded row's from its own generator (ROUNDS a step,
    whatever the batch), the others' from the default one."""
    uniforms = torch.rand(rows, ROUNDS, device=device) if len(generators) < rows \
        else torch.empty(rows, ROUNDS, device=device)
    for row, generator in generators.items():
        uniforms[row] = torch.rand(ROUNDS, generator=generator, device=device)
    return uniforms
