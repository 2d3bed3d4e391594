"""Sampling from the top-p nucleus without sorting the vocabulary.

The sort-based path (sampler.apply_top_k_top_p: sort, softmax, cumsum, scatter back, then the
exponential race) sorts every row's whole vocabulary: at 512 rows of Llama-3's 128k it cost
12.6 ms a decode step on an H100, three llama-1b forwards (benchmarks/sampler_gpu.py).

Here each row draws by rejection, as FlashInfer's top-p sampler does (on CUDA one Triton program
a row reading the model's logits in place, triton_sampling.py; elsewhere sample_top_p below, the
same steps over the rows at once):
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
transformers' warper; the kernel takes the k-th value and masks as it loads), so top-p is judged
on the top-k tokens renormalised, as in the sort-based path. min_p is a floor on the first
round's candidates (sample_top_p's docstring). The uniforms come from the caller: a seeded row's
from its own generator (ROUNDS a step), so its draws do not depend on the batch.
"""
from __future__ import annotations

import torch

GREEDY_EPS = 1e-5  # a temperature below it: the argmax (the sampler's, and the kernel's greedy rows)
ROUNDS = 32        # draws a row at most
MAX_TOP_K = 4096   # a larger top_k: the sort-based path (torch.topk's cost grows with k)
_MIN_UNIFORM = 2.0 ** -25   # a draw's point stays above 0: the walk's first index then holds mass


def kth_values(logits: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """Each row's k-th largest logit ([rows], the logits' dtype; -inf where k is the vocabulary
    size: off). `max_k`: the largest k below the vocabulary size (the caller knows it on the
    host)."""
    kth = logits.topk(max_k, dim=-1).values.gather(1, (top_k.clamp(max=max_k) - 1)[:, None])[:, 0]
    return torch.where(top_k >= logits.shape[1], float("-inf"), kth)


def top_k_mask(logits: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """logits with every entry below its row's k-th largest set to -inf (ties at the k-th kept,
    as transformers' TopKLogitsWarper); rows whose k is the vocabulary size (off) unchanged."""
    return logits.masked_fill(logits < kth_values(logits, top_k, max_k)[:, None], float("-inf"))


def sample_top_p(logits: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor,
                 min_p: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's draws in torch ops over the rows at once (CPU: no vocabulary-wide sort and no
    vocabulary-wide random draw; after the first round only the rows still drawing run, and the
    loop reads whether any is left, which on the CPU waits for nothing). Same arguments as
    triton_sampling.sample_top_p; a row of -inf gives index 0 (its argmax).
    `min_p` (float32 [rows], 0 = off): draws only among the tokens of at least min_p times the
    row's largest probability (vLLM's min-p, applied after top-p): the first round's candidates
    start there, while the top-p test still weighs the whole row, so the draw is from the nucleus
    and that floor together, renormalised, as the sort-based path's (top-p, then min-p masks)."""
    rows = logits.shape[0]
    top = logits.max(dim=-1, keepdim=True).values
    mass = torch.exp(logits - torch.where(top > float("-inf"), top, 0.0))   # -inf entries: 0
    total = mass.sum(dim=-1)
    token = torch.zeros(rows, dtype=torch.int64, device=logits.device)
    low = torch.full((rows,), float("-inf"), dtype=logits.dtype, device=logits.device)
    candidates = total.clone()
    if min_p is not None:   # p >= min_p * p_max  <=>  logit >= max + log(min_p): candidates above the float below
        floor = torch.nextafter(top[:, 0] + torch.log(min_p), torch.tensor(float("-inf"), dtype=logits.dtype))
        low = torch.where(min_p > 0, floor, low)
        candidates = torch.where(logits > low[:, None], mass, 0.0).sum(dim=-1)
    active = torch.nonzero(total > 0).squeeze(1)
    for r in range(ROUNDS):
        if active.numel() == 0:
            break
        if r == 0 and active.numel() == rows and min_p is None:   # every entry a candidate: no copies
            x, e = logits, mass
            held = e
        else:
            x, e = logits[active], mass[active]
            held = torch.where(x > low[active, None], e, 0.0)
        cumulative = held.cumsum(dim=-1)
        # the draw: the first entry whose running mass reaches the point (held there: the point is
        # above 0), kept within the walk's total against rounding (then the last candidate)
        target = torch.minimum(uniforms[active, r].clamp(min=_MIN_UNIFORM) * candidates[active], cumulative[:, -1])
        drawn = torch.searchsorted(cumulative, target[:, None]).squeeze(1)
        x_drawn = x.gather(1, drawn[:, None])
        above = torch.where(x > x_drawn, e, 0.0).sum(dim=-1)
        accept = above < top_p[active] * total[active]
        token[active[accept]] = drawn[accept]
        rejected = active[~accept]
        low[rejected] = x_drawn[~accept, 0]
        candidates[rejected] = above[~accept]
        active = rejected
    if active.numel():   # ROUNDS rejections (a tiny top_p over a near-flat row): the argmax
        token[active] = logits[active].argmax(dim=-1)
    return token


def draw_uniforms(rows: int, generators: dict[int, torch.Generator], device: torch.device) -> torch.Tensor:
    """[rows, ROUNDS] uniforms in [0, 1): a seeded row's from its own generator (ROUNDS a step,
    whatever the batch), the others' from the default one."""
    uniforms = torch.rand(rows, ROUNDS, device=device) if len(generators) < rows \
        else torch.empty(rows, ROUNDS, device=device)
    for row, generator in generators.items():
        uniforms[row] = torch.rand(ROUNDS, generator=generator, device=device)
    return uniforms
