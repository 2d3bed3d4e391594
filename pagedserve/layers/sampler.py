"""Vectorized sampling over the batch: one pass, no per-request Python loop except for the
rows of seeded requests (each draws from its own generator, so its tokens do not depend on
what else is in the batch).

Order: allowed_token_ids, bad words, logit_bias and min_tokens masks -> penalties (repetition, frequency, presence) ->
greedy argmax for temperature 0 -> temperature -> top-k -> top-p -> min-p -> typical-p ->
sample. Logprobs are those of the model's raw distribution (log_softmax of the logits
before any processing), which is vLLM's default ("raw_logprobs"): temperature, penalties,
logit_bias and the filters change which token is drawn, never the logprobs reported for it.
Each row reports the sampled token's logprob and rank (1 = most likely), then the top-k.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagedserve.layers import nucleus
from pagedserve.layers.nucleus import GREEDY_EPS as _EPS


@dataclass
class SamplingTensors:
    """Per-row sampling parameters on the logits' device. Built once per step by the runner."""

    temperature: torch.Tensor            # [B] float; 0 = greedy
    top_k: torch.Tensor | None = None    # [B] int; vocab size = off
    top_p: torch.Tensor | None = None    # [B] float; 1 = off
    min_p: torch.Tensor | None = None    # [B] float; 0 = off
    typical_p: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None   # [B]
    frequency_penalty: torch.Tensor | None = None
    presence_penalty: torch.Tensor | None = None
    # penalties' seen tokens, one entry an occurrence: (row, token), and whether the output (or,
    # under a repetition penalty, the prompt) holds it; rows without penalties have none
    seen_rows: torch.Tensor | None = None            # [N] int64
    seen_tokens: torch.Tensor | None = None          # [N] int64
    seen_in_output: torch.Tensor | None = None       # [N] bool
    bias_rows: torch.Tensor | None = None            # logit_bias as (row, token, value) triples
    bias_tokens: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    mask_rows: torch.Tensor | None = None            # min_tokens: (row, token) set to -inf
    mask_tokens: torch.Tensor | None = None
    allow_rows: torch.Tensor | None = None           # allowed_token_ids: (row, token) kept, the row's others -inf
    allow_tokens: torch.Tensor | None = None
    ban_rows: torch.Tensor | None = None             # bad_words: (row, token) set to -inf this step
    ban_tokens: torch.Tensor | None = None
    ban_active: torch.Tensor | None = None           # bool per ban: it applies (None: all do)
    all_greedy: bool = False
    # the nucleus path (nucleus.py) per row, decided by the row's own parameters so that a seeded
    # row's draws never depend on its batch: the rows that need the sort-based path (typical_p, a
    # top_k above nucleus.MAX_TOP_K; None, for tensors built by hand: every row if typical_p is set
    # or top_k is without max_top_k, else none), and the largest top_k below the vocabulary size
    # among the others (host-side)
    sort_rows: list[int] | None = None
    max_top_k: int | None = None
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    max_num_logprobs: int | None = None

    def select(self, rows: list[int], index: torch.Tensor) -> "SamplingTensors":
        """The draw's parameters of `rows` (their indices also as `index` on the device), in that
        order: what _draw needs of a subset of the batch."""
        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.index_select(0, index)
        position = {row: i for i, row in enumerate(rows)}
        return SamplingTensors(temperature=pick(self.temperature), top_k=pick(self.top_k), top_p=pick(self.top_p),
                               min_p=pick(self.min_p), typical_p=pick(self.typical_p), max_top_k=self.max_top_k,
                               sort_rows=None, generators={position[row]: g for row, g in self.generators.items()
                                                           if row in position})


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor                      # [B] int64
    logprob_token_ids: torch.Tensor | None = None   # [B, 1 + k]: sampled token, then top-k
    logprobs: torch.Tensor | None = None            # [B, 1 + k]
    sampled_ranks: torch.Tensor | None = None       # [B]

    @staticmethod
    def cat(parts: list["SamplerOutput"]) -> "SamplerOutput":
        """Rows of several outputs, in order. Logprob tables are padded to the widest k (a row
        reads only its own 1 + k columns); parts without logprobs get zero tables."""
        token_ids = torch.cat([p.token_ids for p in parts])
        if all(p.logprobs is None for p in parts):
            return SamplerOutput(token_ids)
        width = max(p.logprobs.shape[1] for p in parts if p.logprobs is not None)

        def table(p: SamplerOutput, t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
            if t is None:
                return torch.zeros((p.token_ids.shape[0], width), dtype=dtype, device=token_ids.device)
            return torch.nn.functional.pad(t, (0, width - t.shape[1]))
        return SamplerOutput(
            token_ids,
            torch.cat([table(p, p.logprob_token_ids, torch.int64) for p in parts]),
            torch.cat([table(p, p.logprobs, torch.float32) for p in parts]),
            torch.cat([p.sampled_ranks if p.sampled_ranks is not None
                       else torch.zeros_like(p.token_ids) for p in parts]))


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Repetition (prompt and output tokens: divided by the penalty where positive, else
    multiplied), then frequency (minus the penalty times the output count) and presence (minus
    the penalty once an output holds the token), as vLLM / transformers. Only the seen (row,
    token) pairs change, so only they are computed: the entries are sorted by (row, token), each
    run of equal pairs counts its outputs (index_add into the run's slot), and every entry of a
    run writes the same value. With dense [rows, vocab] passes instead, thr512 llama-1b with
    penalties on every request ran at 28.7k out tok/s against 34.4k (H100, benchmarks/RESULTS.md,
    session 44). No host synchronisation."""
    if t.seen_rows is None or t.seen_rows.numel() == 0:
        return logits
    keys, order = torch.sort(t.seen_rows * logits.shape[1] + t.seen_tokens)
    rows, tokens, in_output = t.seen_rows[order], t.seen_tokens[order], t.seen_in_output[order]
    starts = torch.ones_like(in_output)
    starts[1:] = keys[1:] != keys[:-1]
    run = starts.cumsum(0) - 1   # each entry's run of equal (row, token) pairs
    count = torch.zeros_like(keys).index_add_(0, run, in_output.long())[run]
    value = logits[rows, tokens]
    if t.repetition_penalty is not None:
        penalty = t.repetition_penalty[rows]
        value = torch.where(value > 0, value / penalty, value * penalty)
    if t.frequency_penalty is not None:
        value = value - t.frequency_penalty[rows] * count
    if t.presence_penalty is not None:
        value = value - t.presence_penalty[rows] * (count > 0)
    return logits.index_put((rows, tokens), value)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k and outside the top-p nucleus; ties at the k-th
    value are kept and at least one token always survives, as transformers' warpers do."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(-1, (vocab - top_k.clamp(1, vocab)).long()[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = (cum <= (1 - top_p[:, None])) & (top_p < 1.0)[:, None]   # top_p = 1: row untouched
        remove[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_typical_p(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (transformers' TypicalLogitsWarper, per-row mass)."""
    normalized = logits.log_softmax(dim=-1)
    probs = normalized.exp()
    entropy = -(normalized * probs).nansum(-1, keepdim=True)
    shifted = (-normalized - entropy).abs()
    sorted_scores, sorted_idx = shifted.sort(dim=-1, descending=False)
    cum = logits.gather(-1, sorted_idx).softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass[:, None]).sum(dim=1).clamp(max=logits.shape[-1] - 1)
    # typical_p = 1 leaves the row untouched (a cumsum that rounds to 1 early would cut it)
    remove_sorted = (sorted_scores > sorted_scores.gather(1, last[:, None])) & (mass < 1.0)[:, None]
    remove_sorted[:, 0] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


NUCLEUS_SAMPLING = True   # off: the sort-based path (A/B in benchmarks/sampler_gpu.py)


def _draw(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Every row's draw from softmax(logits / T) under its filters: by rejection from the nucleus
    (nucleus.py: no vocabulary sort; CUDA and CPU) for temperature / top-k / top-p / min-p rows,
    through apply_temperature_and_filters and the exponential race for the rest (t.sort_rows:
    typical_p, a top_k above nucleus.MAX_TOP_K). Each row takes its way by its own parameters,
    never its batch's."""
    rows = logits.shape[0]
    sort_rows = t.sort_rows
    if sort_rows is None:   # tensors built by hand: the sort-based path for all if any row needs it
        sort_rows = list(range(rows)) if t.typical_p is not None or (t.top_k is not None and t.max_top_k is None) \
            else []
    if not NUCLEUS_SAMPLING or logits.device.type not in ("cuda", "cpu"):
        sort_rows = list(range(rows))
    if len(sort_rows) == rows:
        return _sample_sorted(logits, t)
    if not sort_rows:
        return _sample_nucleus(logits, t)
    sort_set = set(sort_rows)
    nucleus_rows = [row for row in range(rows) if row not in sort_set]
    sampled = torch.empty(rows, dtype=torch.int64, device=logits.device)
    for subset, draw in ((nucleus_rows, _sample_nucleus), (sort_rows, _sample_sorted)):
        index = torch.tensor(subset, device=logits.device)
        sampled.index_copy_(0, index, draw(logits.index_select(0, index), t.select(subset, index)))
    return sampled


def _sample_sorted(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """The sort-based path: the filters as masks (apply_temperature_and_filters), then the
    exponential race over the softmax."""
    return _random_sample(apply_temperature_and_filters(logits, t).softmax(dim=-1), t.generators)


def _sample_nucleus(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """The draws of apply_temperature_and_filters + _random_sample, by rejection from the
    nucleus (nucleus.py). On CUDA one kernel reads `logits` in place, whatever their dtype, and
    gives temperature-0 rows their argmax; on the CPU greedy rows draw too (the caller keeps
    their argmax)."""
    top_k = t.top_k is not None and t.max_top_k is not None   # (max_top_k None: every such row's top_k is off)
    top_p = t.top_p if t.top_p is not None else torch.ones_like(t.temperature)
    uniforms = nucleus.draw_uniforms(logits.shape[0], t.generators, logits.device)
    if logits.is_cuda:
        from pagedserve.layers import triton_sampling
        kth = nucleus.kth_values(logits, t.top_k, t.max_top_k) if top_k else None
        return triton_sampling.sample_rows(logits, t.temperature, top_p, uniforms, kth, t.min_p)
    temperature = torch.where(t.temperature < _EPS, torch.ones_like(t.temperature), t.temperature)
    logits = logits / temperature[:, None]
    if top_k:
        logits = nucleus.top_k_mask(logits, t.top_k, t.max_top_k)
    return nucleus.sample_top_p(logits, top_p, uniforms, t.min_p)


def _random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Exponential-race sampling: argmax(p / q) with q ~ Exp(1) is a draw from p. Seeded rows
    draw q from their own generator."""
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for row, generator in generators.items():
        q[row].exponential_(generator=generator)
    return argmax_rows_host(probs.div(q))


def argmax_rows_host(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for a 2-D tensor: the same ids (the first maximum; a NaN counts as the
    maximum, as in torch), through numpy's vectorised argmax for float32 / float64 on the CPU:
    torch's CPU argmax took 115 us over one 49,152-logit row and 12.6 ms over 64 rows on a
    2-core AVX2 machine, numpy's 14 us and 2.1 ms (benchmarks/RESULTS.md, issue 19)."""
    if x.device.type != "cpu" or x.dim() != 2 or x.dtype not in (torch.float32, torch.float64) or x.requires_grad:
        return x.argmax(dim=-1)
    return torch.from_numpy(np.argmax(x.numpy(), axis=-1).astype(np.int64, copy=False))


TRITON_GREEDY = True   # off: torch's argmax (A/B in benchmarks/decode_gpu.py)


def greedy_ids(logits: torch.Tensor, bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """logits.argmax(dim=-1); on CUDA one Triton launch (torch's reduce took 37 us over one
    row of a 128k vocabulary on an H200, more than a llama-1b layer). `bitmask` (a device
    token bitmask, token_bitmask_to_device): masked columns first count as -inf; on CUDA
    that launch reads the mask (instead of xgrammar's kernel writing -inf into the logits
    first: one launch a step less, 1.6-2.4 points of the llama-1b shape's JSON overhead on an
    H200, benchmarks/RESULTS.md issue 20), elsewhere it is applied to the logits."""
    if TRITON_GREEDY and logits.is_cuda and logits.dim() == 2 and logits.stride(1) == 1 \
            and 0 < logits.shape[1] < 2**31 - 1 and (bitmask is None or bitmask.shape[1] * 32 >= logits.shape[1]):
        from pagedserve.layers.triton_ops import argmax_rows
        return argmax_rows(logits, bitmask)
    if bitmask is not None:
        apply_token_bitmask(logits, bitmask)
    return argmax_rows_host(logits)


def apply_bias_and_min_tokens(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """allowed_token_ids (a row's other tokens -inf), then the tokens bad_words ban this step
    (-inf), then logit_bias, then the stop tokens of rows still under min_tokens to -inf, except
    in a row that would have nothing left: one whose structured-outputs grammar (applied
    before), allowed_token_ids or bad words allow only stop tokens keeps them; those are the hard
    constraints (masking their last tokens too left nothing to sample and failed the request)."""
    if t.allow_rows is not None:
        allowed = torch.zeros_like(logits, dtype=torch.bool).index_put_(
            (t.allow_rows, t.allow_tokens), torch.tensor(True, device=logits.device))
        restricted = allowed.any(dim=-1, keepdim=True)   # the rows that have a list (never empty)
        logits = logits.masked_fill(restricted & ~allowed, float("-inf"))
    if t.ban_rows is not None:
        if t.ban_active is None:
            logits = logits.index_put((t.ban_rows, t.ban_tokens), torch.tensor(float("-inf"), device=logits.device))
        else:   # -inf where a ban applies, 0 where not; summed, so one applying ban of a (row, token) wins
            logits = logits.index_put((t.ban_rows, t.ban_tokens), torch.where(
                t.ban_active, float("-inf"), 0.0).to(logits.dtype), accumulate=True)
    if t.bias_rows is not None:
        logits = logits.index_put((t.bias_rows, t.bias_tokens), t.bias_values, accumulate=True)
    if t.mask_rows is not None:
        masked = logits.index_put((t.mask_rows, t.mask_tokens), torch.tensor(float("-inf"), device=logits.device))
        nothing_left = torch.isneginf(masked).all(dim=-1, keepdim=True)
        logits = torch.where(nothing_left, logits, masked)
    return logits


def apply_temperature_and_filters(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Temperature (greedy rows divide by 1), then top-k / top-p, min-p and typical-p: the
    logits that non-greedy rows sample from (removed tokens are -inf)."""
    temperature = torch.where(t.temperature < _EPS, torch.ones_like(t.temperature), t.temperature)
    logits = logits / temperature[:, None]
    logits = apply_top_k_top_p(logits, t.top_k, t.top_p)
    if t.min_p is not None:
        logits = apply_min_p(logits, t.min_p)
    if t.typical_p is not None:
        logits = apply_typical_p(logits, t.typical_p)
    return logits


class Sampler:
    """Stateless; every tensor op covers the whole batch. The only Python loop is over the
    seeded rows (`_random_sample`, or nucleus.draw_uniforms on the nucleus path)."""

    def __call__(self, logits: torch.Tensor, t: SamplingTensors, bitmask: torch.Tensor | None = None
                 ) -> SamplerOutput:
        """`bitmask`: the rows' structured-outputs token bitmask on the logits' device
        (token_bitmask_to_device), applied before anything else."""
        plain = t.max_num_logprobs is None and t.bias_rows is None and t.mask_rows is None \
            and t.allow_rows is None and t.ban_rows is None and t.seen_rows is None
        if plain and t.all_greedy:
            return SamplerOutput(token_ids=greedy_ids(logits, bitmask))   # same ids as on the fp32 copy
        if bitmask is not None:
            apply_token_bitmask(logits, bitmask)
        if plain and t.sort_rows == [] and logits.is_cuda and NUCLEUS_SAMPLING:
            # every row on the nucleus kernel, which reads the logits in place (no float32 copy) and
            # gives greedy rows their argmax: what sampling_inputs.draws_in_place lets sample whole
            return SamplerOutput(token_ids=_sample_nucleus(logits, t))
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if t.max_num_logprobs is not None else None
        logits = apply_bias_and_min_tokens(logits, t)
        logits = apply_penalties(logits, t)
        greedy = argmax_rows_host(logits)   # exact argmax for temperature 0, after bias and penalties
        if t.all_greedy:
            tokens = greedy
        else:
            tokens = torch.where(t.temperature < _EPS, greedy, _draw(logits, t))
        out = SamplerOutput(token_ids=tokens)
        if raw_logprobs is not None:
            out.logprob_token_ids, out.logprobs, out.sampled_ranks = gather_logprobs(
                raw_logprobs, tokens, t.max_num_logprobs)
        return out


def token_bitmask_to_device(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int],
                            staging: torch.Tensor | None = None) -> torch.Tensor:
    """Structured outputs: the token bitmask of every logits row on the logits' device, int32
    [logits rows, width], xgrammar's layout (bit t of a row's words is 0 where token t is not
    allowed), from `bitmask` (an int32 CPU tensor [len(rows), width]: row i for logits row
    rows[i]; the other rows all allowed). Columns of `logits` beyond the mask's 32 * width are
    set to -inf in the rows now (logits wider than the grammar's vocabulary: never allowed).

    One copy, full height, with no `indices` list: a copy from pageable memory (xgrammar's
    list of indices included) first waits for the stream, i.e. for the forward pass the host
    is overlapping. `staging` (CUDA): a pinned host buffer of at least [logits rows, width]
    for that copy; without it `bitmask` must be pinned (or page-locked in place) on CUDA."""
    num_rows, width = logits.shape[0], bitmask.shape[1]
    covered = min(logits.shape[-1], width * 32)
    if rows != list(range(num_rows)):
        full = staging[:num_rows] if staging is not None else torch.empty((num_rows, width), dtype=bitmask.dtype)
        full.fill_(-1)
        full[torch.tensor(rows)] = bitmask
        bitmask = full
    elif staging is not None:
        bitmask = staging[:num_rows].copy_(bitmask)
    if covered < logits.shape[-1]:
        index = torch.tensor(rows, pin_memory=logits.is_cuda).to(logits.device, non_blocking=True)
        logits[index, covered:] = float("-inf")
    return bitmask.to(logits.device, non_blocking=True)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place, set logits[r, t] to -inf where bit t of bitmask[r] is 0 (a device mask of
    every row: token_bitmask_to_device); one xgrammar kernel (Triton on CUDA, C++ on CPU)."""
    import xgrammar
    xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=min(logits.shape[-1], bitmask.shape[1] * 32))


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row: [token, top-1 .. top-k] ids and logprobs, and the token's rank (1 = best)."""
    token_lp = logprobs.gather(-1, token_ids[:, None].long())
    ranks = (logprobs > token_lp).sum(dim=-1) + 1
    if k > 0:
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        ids = torch.cat([token_ids[:, None].long(), top_ids], dim=1)
        lps = torch.cat([token_lp, top_lp], dim=1)
    else:
        ids, lps = token_ids[:, None].long(), token_lp
    return ids, lps, ranks
