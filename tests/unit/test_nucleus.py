"""nucleus.py: draws from the top-p nucleus without sorting, in torch ops (CPU) and as the Triton
kernel (triton_sampling.py: Triton's interpreter on CPU, the kernel on CUDA). Every draw lies in
the nucleus the sort-based rule defines, the draws follow the nucleus renormalised, both forms draw
the same tokens from the same uniforms, top-k masks as transformers' warper, seeded rows do not
depend on the batch; the Sampler takes this path for temperature / top-k / top-p rows."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper

from pagedserve.layers import nucleus
from pagedserve.layers import sampler as sampler_module
from pagedserve.layers.nucleus import MAX_TOP_K, ROUNDS, draw_uniforms, top_k_mask
from pagedserve.layers.sampler import Sampler, SamplingTensors

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# the kernel's block (triton_sampling.BLOCK) in these tests: on the CPU, under Triton's interpreter,
# a smaller one (each program's block is a numpy array there: at 8192 this file took ~12 s more)
if DEVICE.type == "cuda":
    from pagedserve.layers.triton_sampling import BLOCK
else:
    BLOCK = 1024


@pytest.fixture(autouse=True)
def _kernel_block(monkeypatch) -> None:
    if HAS_TRITON and DEVICE.type == "cpu":
        from pagedserve.layers import triton_sampling
        monkeypatch.setattr(triton_sampling, "BLOCK", BLOCK)


def _kernel(logits: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    from pagedserve.layers import triton_sampling
    return triton_sampling.sample_top_p(logits, top_p, uniforms)


def _torch(logits: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    return nucleus.sample_top_p(logits.cpu(), top_p.cpu(), uniforms.cpu()).to(logits.device)


HAS_TRITON = importlib.util.find_spec("triton") is not None
FORMS = [pytest.param(_torch, id="torch"),
         pytest.param(_kernel, id="kernel", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"))]


def sort_rule(logits: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sort-based rule in float64: token t is kept iff the mass above it is under top_p;
    returns (kept, the kept tokens' renormalised probabilities over the vocabulary)."""
    p = logits.double().softmax(-1)
    order = p.argsort(descending=True)
    above = torch.cumsum(p[order], 0) - p[order]
    kept = torch.zeros_like(p, dtype=torch.bool)
    kept[order[above < top_p]] = True
    q = torch.where(kept, p, 0.0)
    return kept, q / q.sum()


@pytest.mark.parametrize("sample_top_p", FORMS)
@pytest.mark.parametrize("top_p, scale", [(0.8, 0.7), (0.3, 1.5), (1.0, 1.0)])
def test_draws_follow_the_nucleus(sample_top_p, top_p: float, scale: float) -> None:
    gen = torch.Generator().manual_seed(int(top_p * 10))
    vocab, rows = 40, 800
    logits = torch.randn(vocab, generator=gen) * scale
    kept, q = sort_rule(logits, top_p)
    assert 1 < int(kept.sum()) or top_p < 0.5
    ids = sample_top_p(logits[None].repeat(rows, 1).to(DEVICE), torch.full((rows,), top_p, device=DEVICE),
                       torch.rand(rows, ROUNDS, generator=gen).to(DEVICE)).cpu()
    assert kept[ids].all()   # never outside the nucleus
    freq = torch.bincount(ids, minlength=vocab).double() / rows
    # each token's frequency within 4.5 standard deviations of its probability
    assert ((freq - q).abs() <= 4.5 * (q * (1 - q) / rows).sqrt() + 1e-9).all(), (freq - q).abs().max()


def _kernel_min_p(logits, top_p, uniforms, min_p):
    from pagedserve.layers import triton_sampling
    return triton_sampling.sample_rows(logits, torch.ones(logits.shape[0], device=logits.device), top_p, uniforms,
                                       min_p=min_p)


def _torch_min_p(logits, top_p, uniforms, min_p):
    return nucleus.sample_top_p(logits.cpu(), top_p.cpu(), uniforms.cpu(), min_p.cpu()).to(logits.device)


@pytest.mark.parametrize("sample_min_p", [
    pytest.param(_torch_min_p, id="torch"),
    # (under Triton's interpreter 3,000 rows take ~30 s a case: the kernel's min_p draws are pinned to the torch
    # form's there by test_the_kernel_reads_bf16_logits_in_place_with_every_filter)
    pytest.param(_kernel_min_p, id="kernel", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("top_p, min_p", [(0.9, 0.2), (0.5, 0.05), (1.0, 0.6)])
def test_min_p_draws_follow_the_nucleus_above_the_floor(sample_min_p, top_p: float, min_p: float) -> None:
    """With min_p: draws from the top-p nucleus (of the whole row) intersected with the tokens of
    at least min_p times the largest probability, renormalised (the sort-based path masks top-p,
    then min-p)."""
    gen = torch.Generator().manual_seed(int(min_p * 100))
    vocab, rows = 40, 3000
    logits = torch.randn(vocab, generator=gen) * 0.8
    kept, _ = sort_rule(logits, top_p)
    p = logits.double().softmax(-1)
    kept &= p >= min_p * p.max()
    q = torch.where(kept, p, 0.0)
    q /= q.sum()
    assert 1 < int(kept.sum()) < vocab
    ids = sample_min_p(logits[None].repeat(rows, 1).to(DEVICE), torch.full((rows,), top_p, device=DEVICE),
                       torch.rand(rows, ROUNDS, generator=gen).to(DEVICE), torch.full((rows,), min_p, device=DEVICE)).cpu()
    assert kept[ids].all()
    freq = torch.bincount(ids, minlength=vocab).double() / rows
    assert ((freq - q).abs() <= 4.5 * (q * (1 - q) / rows).sqrt() + 1e-9).all(), (freq - q).abs().max()


@pytest.mark.parametrize("sample_top_p", FORMS)
def test_masked_entries_are_never_drawn_and_ties_go_together(sample_top_p) -> None:
    """-inf entries have no mass; tokens of one logit are kept or dropped together (the 4 tied at
    the top hold 0.9 of the mass: top_p 0.5 keeps all four)."""
    logits = torch.full((64,), float("-inf"))
    logits[[3, 9, 17, 40]] = 5.0
    logits[[1, 2]] = logits[3] + torch.log(torch.tensor(0.1 / 2 / 0.9 * 4))   # 0.05 each
    rows = 400
    ids = sample_top_p(logits[None].repeat(rows, 1).to(DEVICE), torch.full((rows,), 0.5, device=DEVICE),
                       torch.rand(rows, ROUNDS, generator=torch.Generator().manual_seed(1)).to(DEVICE)).cpu()
    assert set(ids.tolist()) == {3, 9, 17, 40}


@pytest.mark.parametrize("sample_top_p", FORMS)
def test_a_masked_first_block_leaves_the_sum_finite(sample_top_p) -> None:
    """A top-k mask leaves whole blocks of -inf: a row whose first BLOCK entries are masked
    draws from its nucleus (not, after every round rejected, its argmax alone)."""
    vocab, rows = BLOCK + 300, 150
    logits = torch.full((vocab,), float("-inf"))
    logits[BLOCK + 10:BLOCK + 14] = torch.tensor([2.0, 1.9, 1.8, 1.7])
    ids = sample_top_p(logits[None].repeat(rows, 1).to(DEVICE), torch.full((rows,), 0.9, device=DEVICE),
                       torch.rand(rows, ROUNDS, generator=torch.Generator().manual_seed(2)).to(DEVICE)).cpu()
    kept, q = sort_rule(logits, 0.9)
    assert kept[ids].all() and len(set(ids.tolist())) == int(kept.sum()) == 4


@pytest.mark.parametrize("sample_top_p", FORMS)
def test_a_row_of_minus_inf_takes_its_argmax(sample_top_p) -> None:
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


@pytest.mark.parametrize("sample_top_p", FORMS)
def test_seeded_rows_do_not_depend_on_the_batch(sample_top_p) -> None:
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    top_p = torch.tensor([0.9, 0.9, 0.5], device=DEVICE)

    def draw(seeds: dict[int, int], order: list[int]) -> torch.Tensor:
        generators = {row: torch.Generator(device=DEVICE).manual_seed(seed) for row, seed in seeds.items()}
        return sample_top_p(logits[order].contiguous(), top_p[order], draw_uniforms(len(order), generators, DEVICE))

    first = draw({0: 7, 2: 11}, [0, 1, 2])
    again = draw({1: 7, 0: 11}, [2, 0])   # the same seeded rows, another batch and order
    assert first[0] == again[1] and first[2] == again[0]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_the_kernel_and_the_torch_form_draw_the_same_tokens() -> None:
    """The same uniforms give the same tokens (one algorithm twice), rejections included."""
    gen = torch.Generator().manual_seed(8)
    logits = (torch.randn(64, 300, generator=gen) * torch.linspace(0.3, 3.0, 64)[:, None]).to(DEVICE)
    top_p = torch.rand(64, generator=gen).clamp(min=0.05).to(DEVICE)
    uniforms = torch.rand(64, ROUNDS, generator=gen).to(DEVICE)
    assert torch.equal(_kernel(logits, top_p, uniforms), _torch(logits, top_p, uniforms))


def test_sampler_takes_the_nucleus_path_for_top_p_rows(monkeypatch) -> None:
    calls = []
    real = sampler_module._sample_nucleus
    monkeypatch.setattr(sampler_module, "_sample_nucleus", lambda x, t: calls.append(x.shape) or real(x, t))
    logits = torch.randn(4, 1000, device=DEVICE) * 3
    t = SamplingTensors(temperature=torch.tensor([0.0, 0.8, 1.0, 0.5], device=DEVICE),
                        top_p=torch.tensor([1.0, 0.9, 1.0, 0.3], device=DEVICE),
                        top_k=torch.tensor([1000, 1000, 20, 1000], device=DEVICE), max_top_k=20)
    out = Sampler()(logits, t)
    assert calls == [(4, 1000)] and out.token_ids[0] == logits[0].argmax()
    kept, _ = sort_rule(logits[3].cpu() / 0.5, 0.3)
    assert kept[out.token_ids[3].cpu()]
    assert out.token_ids[2] in logits[2].topk(20).indices
    t.min_p = torch.zeros(4, device=DEVICE)   # min_p: the nucleus path too
    Sampler()(logits, t)
    assert len(calls) == 2
    t.typical_p = torch.ones(4, device=DEVICE)   # typical_p: the sort-based path
    Sampler()(logits, t)
    assert len(calls) == 2


def test_each_row_takes_its_own_way_so_seeded_rows_ignore_their_batch(monkeypatch) -> None:
    """A typical_p row (the sort-based path) beside temperature / top-p / min_p rows (the nucleus
    path): each row's way is its own, so a seeded top-p row draws the same tokens alone as beside
    it, and the nucleus path sees only its rows."""
    from pagedserve.sampling_params import SamplingParams
    from pagedserve.worker.input_batch import CachedRequestState
    from pagedserve.worker.sampling_inputs import build_sampling_tensors
    vocab = 200
    logits = (torch.randn(4, vocab, generator=torch.Generator().manual_seed(9)) * 0.5).to(DEVICE)
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=21), SamplingParams(temperature=1.0, min_p=0.2),
              SamplingParams(temperature=1.0, typical_p=0.5, seed=3), SamplingParams(temperature=0.8, top_k=30)]
    shapes = []
    real = sampler_module._sample_nucleus
    monkeypatch.setattr(sampler_module, "_sample_nucleus", lambda x, t: shapes.append(x.shape[0]) or real(x, t))

    def draws(rows: list[int], steps: int = 12) -> list[list[int]]:
        states = []
        for row in rows:
            p = params[row]
            generator = None if p.seed is None else torch.Generator(device=DEVICE).manual_seed(p.seed)
            states.append(CachedRequestState(str(row), [1, 2], 2, p, [0], 2, generator))
        tensors = [build_sampling_tensors(states, vocab, DEVICE, (0,)) for _ in range(steps)]
        return [Sampler()(logits[rows], t).token_ids.tolist() for t in tensors]

    together = draws([0, 1, 2, 3])
    assert set(shapes) == {3}   # rows 0, 1 (min_p) and 3
    alone = draws([0])
    assert [step[0] for step in together] == [step[0] for step in alone]
    assert len({step[0] for step in alone}) > 3


def _reference_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor,
                    top_k: torch.Tensor, max_k: int, min_p: torch.Tensor) -> torch.Tensor:
    """What the Sampler's CPU way does with the same rows: float32 copy, temperature, top-k mask,
    the torch form's draw; greedy rows their argmax."""
    x = logits.float().cpu()
    temperature, top_k = temperature.cpu(), top_k.cpu()
    scaled = top_k_mask(x / torch.where(temperature < 1e-5, 1.0, temperature)[:, None], top_k, max_k)
    drawn = nucleus.sample_top_p(scaled, top_p.cpu(), uniforms.cpu(), min_p.cpu())
    return torch.where(temperature < 1e-5, x.argmax(dim=-1), drawn)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_the_kernel_reads_bf16_logits_in_place_with_every_filter() -> None:
    """sample_rows on bf16 logits, a strided view (no copy made), with per-row temperatures
    (greedy rows among them), top-k thresholds, top-p and min-p: the same tokens as the float32
    copy through the CPU's steps, from the same uniforms."""
    from pagedserve.layers import triton_sampling
    gen = torch.Generator().manual_seed(12)
    rows, vocab = 48, 2 * BLOCK + 800   # two blocks and a part: the masks cross a block's edge
    wide = (torch.randn(rows, vocab + 70, generator=gen) * 2.5).bfloat16().to(DEVICE)
    logits = wide[:, 35:35 + vocab]
    temperature = torch.rand(rows, generator=gen) * 1.5 + 0.2
    temperature[::7] = 0.0
    top_k = torch.where(torch.rand(rows, generator=gen) < 0.5, torch.randint(1, 300, (rows,), generator=gen), vocab)
    top_p = torch.where(torch.rand(rows, generator=gen) < 0.7, torch.rand(rows, generator=gen) * 0.9 + 0.05, 1.0)
    min_p = torch.where(torch.rand(rows, generator=gen) < 0.4, torch.rand(rows, generator=gen) * 0.3, 0.0)
    uniforms = torch.rand(rows, ROUNDS, generator=gen)
    max_k = int(top_k[top_k < vocab].max())
    kth = nucleus.kth_values(logits, top_k.to(DEVICE), max_k)
    assert kth.dtype == torch.bfloat16
    ours = triton_sampling.sample_rows(logits, temperature.to(DEVICE), top_p.to(DEVICE), uniforms.to(DEVICE), kth,
                                       min_p.to(DEVICE)).cpu()
    expected = _reference_rows(logits, temperature, top_p, uniforms, top_k, max_k, min_p)
    assert torch.equal(ours, expected)
    greedy = temperature < 1e-5
    assert torch.equal(ours[greedy], logits.float().cpu()[greedy].argmax(dim=-1))
    assert len(set(ours[~greedy].tolist())) > rows // 2   # draws, not argmaxes


def test_plain_draw_rows_are_sampled_whole_on_cuda_only() -> None:
    """sampling_inputs.draws_in_place: rows that only draw (temperature, top-k up to MAX_TOP_K,
    top-p, min-p, a seed) go in one sampler pass on CUDA (the kernel makes no copy); a row with
    logprobs, penalties, bias, typical-p or a large top-k sends the step back to chunks."""
    from pagedserve.sampling_params import SamplingParams
    from pagedserve.worker.input_batch import CachedRequestState
    from pagedserve.worker.sampling_inputs import draws_in_place

    def state(**kwargs) -> CachedRequestState:
        return CachedRequestState("r", [1, 2], 2, SamplingParams(**kwargs), [0], 2)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    plain = [state(temperature=0.8, top_p=0.9), state(temperature=0.0), state(temperature=1.0, top_k=50, min_p=0.1),
             state(temperature=0.7, seed=3)]
    assert draws_in_place(plain, cuda) and not draws_in_place(plain, cpu)
    assert draws_in_place([state(temperature=0.0)], cpu)   # plain greedy: one argmax anywhere
    for other in (dict(logprobs=2), dict(frequency_penalty=0.5), dict(logit_bias={3: 1.0}), dict(typical_p=0.9),
                  dict(top_k=MAX_TOP_K + 1), dict(min_tokens=2)):
        assert not draws_in_place(plain + [state(temperature=0.8, **other)], cuda), other
    sampler_module.NUCLEUS_SAMPLING = False
    try:
        assert not draws_in_place(plain, cuda)
    finally:
        sampler_module.NUCLEUS_SAMPLING = True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_sampler_hands_plain_rows_the_model_logits_on_cuda(monkeypatch) -> None:
    """On CUDA, a batch of rows that only draw reaches the kernel as the model's bf16 logits (no
    float32 copy); greedy rows among them keep their argmax."""
    from pagedserve.sampling_params import SamplingParams
    from pagedserve.worker.input_batch import CachedRequestState
    from pagedserve.worker.sampling_inputs import sample
    seen = []
    real = sampler_module._sample_nucleus
    monkeypatch.setattr(sampler_module, "_sample_nucleus", lambda x, t: seen.append(x.dtype) or real(x, t))
    vocab = 5000
    logits = (torch.randn(300, vocab, device="cuda") * 3).bfloat16()
    states = [CachedRequestState(str(i), [1, 2], 2, SamplingParams(temperature=0.0 if i % 3 == 0 else 0.9,
                                                                   top_p=0.9, min_p=0.02 * (i % 2)), [0], 2)
              for i in range(300)]
    out = sample(Sampler(), logits, states, vocab, torch.device("cuda"), (2,))
    assert seen == [torch.bfloat16]   # one pass, over all 300 rows (chunks hold 128)
    assert torch.equal(out.token_ids[::3], logits[::3].argmax(dim=-1))
