"""The nucleus draw of nucleus.py as one Triton program a row (CUDA), reading the model's logits
where they are (any float dtype, any row stride): the temperature (a factor of each mass's
exponent), the top-k threshold and the min-p floor are applied as each block is loaded, so no
[rows, vocab] float32 copy is made. Per
row: a max / normaliser pass (which also gives the argmax: temperature-0 rows stop there), a
pass for the mass above the min-p floor where one is set, then per round a walk of the
cumulative mass to the draw and a pass for the mass above it."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.layers.nucleus import GREEDY_EPS, ROUNDS

BLOCK = 8192       # vocabulary entries a program reads at a time (benchmarks/sampler_sweep.py: 8192 x 16 warps)
NUM_WARPS = 16


LOG2_E = 1.4426950408889634


@triton.jit
def _masked(base, start, offs, vocab, kth):
    """One block of a row's logits in float32, -inf below the top-k threshold `kth` and past the
    row's end."""
    raw = tl.load(base + start + offs, mask=start + offs < vocab, other=float("-inf")).to(tl.float32)
    return tl.where(raw >= kth, raw, float("-inf"))


@triton.jit
def _sample_kernel(logits_ptr, stride_row, temperature_ptr, kth_ptr, top_p_ptr, min_p_ptr, uniform_ptr, out_ptr,
                   vocab, HAS_KTH: tl.constexpr, HAS_MIN_P: tl.constexpr, ROUNDS: tl.constexpr,
                   BLOCK: tl.constexpr, EPS: tl.constexpr, LOG2_E: tl.constexpr):
    # Everything stays in the logits' own units: the mass of x is exp((x - max) / T), computed as
    # exp2((x - max) * log2(e) / T), so no element is divided (the comparisons are unchanged by a
    # positive scale).
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature < EPS
    temperature = tl.where(greedy, 1.0, temperature)
    scale = LOG2_E / temperature
    kth = float("-inf")
    if HAS_KTH:
        kth = tl.load(kth_ptr + row)
    # pass 1: the maximum (and its first index) and Z = sum of the masses, online
    m = float("-inf")
    z = 0.0
    best = 0
    for start in range(0, vocab, BLOCK):
        x = _masked(base, start, offs, vocab, kth)
        block_max = tl.max(x, 0)
        if block_max > m:
            best = start + tl.argmax(x, 0)
        m_new = tl.maximum(m, block_max)
        # masked (-inf) entries add nothing, also while every entry so far is masked (exp(-inf -
        # -inf) is NaN: a top-k mask leaves whole blocks so)
        z = tl.where(m == float("-inf"), 0.0, z * tl.exp2((m - m_new) * scale)) \
            + tl.sum(tl.where(x > float("-inf"), tl.exp2((x - m_new) * scale), 0.0), 0)
        m = m_new
    top_p = tl.load(top_p_ptr + row)
    low = float("-inf")   # the candidates: finite entries above low (at or above it while inclusive)
    inclusive = 0
    candidates = z        # their mass
    token = best          # the fallback: the argmax is always in the nucleus
    r = 0
    if greedy:
        r = ROUNDS
    if HAS_MIN_P:
        min_p = tl.load(min_p_ptr + row)
        if (min_p > 0.0) & (r < ROUNDS):   # p >= min_p * p_max  <=>  x >= max + T * log(min_p)
            low = m + temperature * tl.log(min_p)
            inclusive = 1
            candidates = 0.0
            for start in range(0, vocab, BLOCK):
                x = _masked(base, start, offs, vocab, kth)
                candidates += tl.sum(tl.where((x >= low) & (x > float("-inf")), tl.exp2((x - m) * scale), 0.0), 0)
    while r < ROUNDS:
        target = tl.load(uniform_ptr + row * ROUNDS + r) * candidates
        # the draw: the first candidate where the running mass reaches target (the last
        # candidate if rounding leaves target above the walk's total)
        running = 0.0
        drawn = -1
        last = -1
        start = 0
        while start < vocab:
            x = _masked(base, start, offs, vocab, kth)
            keep = ((x > low) | ((x >= low) & (inclusive != 0))) & (x > float("-inf"))
            p = tl.where(keep, tl.exp2((x - m) * scale), 0.0)
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
            x_drawn = tl.load(base + drawn).to(tl.float32)   # (a candidate: >= kth)
            # the mass strictly above the drawn token's logit
            above = 0.0
            for start2 in range(0, vocab, BLOCK):
                x = _masked(base, start2, offs, vocab, kth)
                above += tl.sum(tl.where(x > x_drawn, tl.exp2((x - m) * scale), 0.0), 0)
            if above < top_p * z:
                token = drawn
                r = ROUNDS
            else:
                low = x_drawn
                inclusive = 0
                candidates = above
                r += 1
    tl.store(out_ptr + row, token.to(tl.int64))


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor,
                kth: torch.Tensor | None = None, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """One token id a row of `logits` ([rows, vocab], any float dtype, unit column stride; read in
    place): a row of temperature < GREEDY_EPS takes its argmax (the first maximum); the others
    draw from softmax(logits / temperature) restricted to the logits at or above `kth` (raw units,
    the top-k threshold, -inf or None: off), to its top-p nucleus (top_p [rows], 1 keeps every
    token) and, where min_p [rows] > 0, to the tokens of at least min_p times the largest
    probability (nucleus.sample_top_p's floor: the top-p test still weighs the whole row), using
    `uniforms` (float32 [rows, ROUNDS] in [0, 1): nucleus.draw_uniforms). -inf entries are never
    drawn; a row of -inf gives its argmax (index 0)."""
    rows, vocab = logits.shape
    if not logits.is_floating_point() or logits.stride(1) != 1 or temperature.shape != (rows,) \
            or top_p.shape != (rows,) or uniforms.shape != (rows, ROUNDS) or not uniforms.is_contiguous() \
            or (kth is not None and kth.shape != (rows,)) or (min_p is not None and min_p.shape != (rows,)):
        raise ValueError(f"sample_rows: need float [rows, vocab] logits with unit column stride, [rows] temperature, "
                         f"top_p, kth and min_p, and uniforms [rows, {ROUNDS}]; got {logits.dtype} "
                         f"{tuple(logits.shape)} strides {logits.stride()}, {tuple(temperature.shape)}, "
                         f"{tuple(top_p.shape)}, {tuple(uniforms.shape)}")
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        def f32(x: torch.Tensor | None) -> torch.Tensor:
            return top_p if x is None else x.to(torch.float32).contiguous()   # (unread when None)
        _sample_kernel[(rows,)](logits, logits.stride(0), f32(temperature), f32(kth), f32(top_p), f32(min_p),
                                uniforms, out, vocab, HAS_KTH=kth is not None, HAS_MIN_P=min_p is not None,
                                ROUNDS=ROUNDS, BLOCK=BLOCK, EPS=GREEDY_EPS, LOG2_E=LOG2_E, num_warps=NUM_WARPS)
    return out


def sample_top_p(logits: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """sample_rows at temperature 1 without top-k or min-p (nucleus.sample_top_p's arguments)."""
    return sample_rows(logits, torch.ones(logits.shape[0], device=logits.device), top_p, uniforms)
