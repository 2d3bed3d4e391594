"""triton_sampling: draws from the top-p nucleus without sorting (Triton's interpreter on CPU,
the kernel on CUDA). Every draw lies in the nucleus the sort-based rule defines, the draws follow
the nucleus renormalised, top-k masks as transformers' warper, seeded rows do not depend on the
batch; on CUDA the Sampler takes this path for temperature / top-k / top-p rows."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from transformers.generation.logits_process import TopKLogitsWarper  # noqa: E402

from pagedserve.layers import sampler as sampler_module  # noqa: E402
from pagedserve.layers.sampler import Sampler, SamplingTensors  # noqa: E402
from pagedserve.layers.triton_sampling import BLOCK, ROUNDS, draw_uniforms, sample_top_p, top_k_mask  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def nucleus(logits: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sort-based rule in float64: token t is kept iff the mass above it is under top_p;
    returns (kept, the kept tokens' renormalised probabilities over the vocabulary)."""
    p = logits.double().softmax(-1)
    order = p.argsort(descending=True)
    above = torch.cumsum(p[order], 0) - p[order]
    kept = torch.zeros_like(p, dtype=torch.bool)
    kept[order[above < top_p]] = True
    q = torch.where(kept, p, 0.0)
    return kept, q / q.sum()


@pytest.mark.parametrize("top_p, scale", [(0.8, 0.7), (0.3, 1.5), (1.0, 1.0)])
def test_draws_follow_the_nucleus(top_p: float, scale: float) -> None:
    gen = torch.Generator().manual_seed(int(top_p * 10))
    vocab, rows = 40, 800
    logits = torch.randn(vocab, generator=gen) * scale
    kept, q = nucleus(logits, top_p)
    assert 1 < int(kept.sum()) or top_p < 0.5
    ids = sample_top_p(logits[None].repeat(rows, 1).to(DEVICE), torch.full((rows,), top_p, device=DEVICE),
                       torch.rand(rows, ROUNDS, generator=gen).to(DEVICE)).cpu()
    assert kept[ids].all()   # never outside the nucleus
    freq = torch.bincount(ids, minlength=vocab).double() / rows
    # each token's frequency within 4.5 standard deviations of its probability
    assert ((freq - q).abs() <= 4.5 * (q * (1 - q) / rows).sqrt() + 1e-9).all(), (freq - q).abs().max()


def test_masked_entries_are_never_drawn_and_ties_go_together() -> None:
    """-inf entries have no mass; tokens of one logit are kept or dropped together (the 4 tied at
    the top hold 0.9 of the mass: top_p 0.5 keeps all four)."""
    logits = torch.full((64,), float("-inf"))
    logits[[3, 9, 17, 40]] = 5.0
    logits[[1, 2]] = logits[3] + torch.log(torch.tensor(0.1 / 2 / 0.9 * 4))   # 0.05 each
    rows = 400
    ids = sample_top_p(logits[None].repeat(rows, 1).to(DEVICE), torch.full((rows,), 0.5, device=DEVICE),
                       torch.rand(rows, ROUNDS, generator=torch.Generator().manual_seed(1)).to(DEVICE)).cpu()
    assert set(ids.tolist()) == {3, 9, 17, 40}


def test_a_masked_first_block_leaves_the_sum_finite() -> None:
    """A top-k mask leaves whole blocks of -inf: a row whose first BLOCK entries are masked
    draws from its nucleus (not, after every round rejected, its argmax alone)."""
    vocab, rows = BLOCK + 300, 150
    logits = torch.full((vocab,), float("-inf"))
    logits[BLOCK + 10:BLOCK + 14] = torch.tensor([2.0, 1.9, 1.8, 1.7])
    ids = sample_top_p(logits[None].repeat(rows, 1).to(DEVICE), torch.full((rows,), 0.9, device=DEVICE),
                       torch.rand(rows, ROUNDS, generator=torch.Generator().manual_seed(2)).to(DEVICE)).cpu()
    kept, q = nucleus(logits, 0.9)
    assert kept[ids].all() and len(set(ids.tolist())) == int(kept.sum()) == 4


def test_a_row_of_minus_inf_takes_its_argmax() -> None:
    """Nothing to draw (every entry -inf): index 0, the argmax's, and no read outside the row."""
    logits = torch.full((2, 100), float("-inf"))
    logits[1, 7] = 0.0
    ids = sample_top_p(logits.to(DEVICE), torch.full((2,), 0.9, device=DEVICE), torch.rand(2, ROUNDS).to(DEVICE))
    assert ids.tolist() == [0, 7]


def test_top_k_mask_equals_transformers_warper() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 300, generator=gen)
    logits[1, :10] = 4.0   # ties at the k-th value are kept
    top_k = torch.tensor([1, 7, 50, 300, 2])
    ours = top_k_mask(logits.to(DEVICE), top_k.to(DEVICE), 50).cpu()
    for row, k in enumerate(top_k.tolist()):
        theirs = TopKLogitsWarper(k)(None, logits[row:row + 1].clone())
        assert torch.equal(ours[row:row + 1], theirs), row
    assert int(torch.isfinite(ours[1]).sum()) == 10


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    top_p = torch.tensor([0.9, 0.9, 0.5], device=DEVICE)

    def draw(seeds: dict[int, int], order: list[int]) -> torch.Tensor:
        generators = {row: torch.Generator(device=DEVICE).manual_seed(seed) for row, seed in seeds.items()}
        return sample_top_p(logits[order].contiguous(), top_p[order], draw_uniforms(len(order), generators, DEVICE))

    first = draw({0: 7, 2: 11}, [0, 1, 2])
    again = draw({1: 7, 0: 11}, [2, 0])   # the same seeded rows, another batch and order
    assert first[0] == again[1] and first[2] == again[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Sampler takes the kernel on CUDA only")
def test_sampler_takes_the_kernel_for_top_p_rows(monkeypatch) -> None:
    calls = []
    real = sampler_module._sample_nucleus
    monkeypatch.setattr(sampler_module, "_sample_nucleus", lambda x, t: calls.append(x.shape) or real(x, t))
    logits = torch.randn(4, 1000, device=DEVICE) * 3
    t = SamplingTensors(temperature=torch.tensor([0.0, 0.8, 1.0, 0.5], device=DEVICE),
                        top_p=torch.tensor([1.0, 0.9, 1.0, 0.3], device=DEVICE),
                        top_k=torch.tensor([1000, 1000, 20, 1000], device=DEVICE), max_top_k=20)
    out = Sampler()(logits, t)
    assert calls == [(4, 1000)] and out.token_ids[0] == logits[0].argmax()
    kept, _ = nucleus(logits[3].cpu() / 0.5, 0.3)
    assert kept[out.token_ids[3].cpu()]
    assert out.token_ids[2] in logits[2].topk(20).indices
    t.min_p = torch.zeros(4, device=DEVICE)   # min_p: the sort-based path
    Sampler()(logits, t)
    assert len(calls) == 1
