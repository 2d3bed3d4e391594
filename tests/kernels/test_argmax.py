"""argmax_rows (one launch, split rows merged by the last program) equals torch.argmax(dim=-1)
exactly: ties broken to the first index (within a lane, across lanes, across splits), rows of
-inf, NaN as the largest, widths that are not multiples of the block, strided rows."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from pagedserve.layers import triton_ops  # noqa: E402
from pagedserve.layers.triton_ops import argmax_rows  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if DEVICE.type == "cuda" else [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 1000, 2048, 5000, 70001])
def test_argmax_rows_equals_torch(dtype: torch.dtype, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=gen)
    x[1] = float("-inf")                                  # all -inf: index 0
    x[2, n // 3:] = x[2].max() + 1                        # a long run of ties: its first index
    if n > 2:
        x[3, -1] = x[3, 1] = x[3].max() + 1               # ties at both ends (first and last split)
        x[4, n // 2] = float("nan")                       # NaN wins
    x[5] = 0.0                                            # all equal: index 0
    x = x.to(DEVICE, dtype)
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    assert int(triton_ops._counter_holder(DEVICE)[-1].abs().sum()) == 0


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 64])
def test_every_split_count_equals_torch(splits: int) -> None:
    """Whatever programs a row the launch takes (argmax_rows's `splits`, what argmax_splits picks by
    the row count), ties across slices go to the first index and the counters end zeroed; a
    count past the columns' slices drops the empty ones, one out of range is refused."""
    n = 9000
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(splits))
    x[0, 100] = x[0, n - 5] = x[0].max() + 1            # a tie in the first and the last slice
    x[1, 4100] = x[1, 8191] = x[1].max() + 1            # in two middle slices
    x[2] = float("-inf")
    x = x.to(DEVICE)
    assert torch.equal(argmax_rows(x, splits=splits), x.argmax(dim=-1))
    assert int(triton_ops._counter_holder(DEVICE)[-1].abs().sum()) == 0
    with pytest.raises(ValueError, match="splits"):
        argmax_rows(x, splits=triton_ops.ARGMAX_MAX_SPLITS + 1)


def test_split_rule_by_rows() -> None:
    """A row alone keeps the most programs (the batch-1 step's launch, unchanged); many rows take
    fewer, ~ARGMAX_PROGRAMS in all (the H200 sweep of session 31); short rows at least two blocks
    a program."""
    vocab = 128256
    assert [triton_ops.argmax_splits(r, vocab) for r in (1, 16, 32, 64, 128, 256, 410, 512, 4096)] == \
        [63, 63, 32, 16, 8, 4, 3, 2, 1]
    assert triton_ops.argmax_splits(1, 1000) == 1 and triton_ops.argmax_splits(1, 49152) == 24


def test_strided_rows_and_repeat() -> None:
    full = torch.randn(5, 3000, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    view = full[::2, 7:2900]
    for _ in range(2):
        assert torch.equal(argmax_rows(view), view.argmax(dim=-1))


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        argmax_rows(torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError):
        argmax_rows(torch.zeros(3, 4, device=DEVICE).t())
    assert argmax_rows(torch.zeros(0, 9, device=DEVICE)).shape == (0,)


def test_counters_grow_without_freeing_what_graphs_captured() -> None:
    """A larger counter buffer joins the per-device list: a CUDA graph captured with the
    smaller one keeps pointing at live, zeroed memory."""
    first = triton_ops.zeroed_counters(DEVICE, 16)
    grown = triton_ops.zeroed_counters(DEVICE, first.numel() + 1)
    assert grown.numel() > first.numel() and int(grown.abs().sum()) == 0
    assert any(t is first for t in triton_ops._counter_holder(DEVICE))
    assert triton_ops.zeroed_counters(DEVICE, 16) is grown


@pytest.mark.parametrize("n", [1, 1000, 5000, 49152])
def test_masked_argmax_equals_mask_then_argmax(n: int) -> None:
    """argmax_rows(x, bitmask) gives the ids of xgrammar's in-place mask (column c of row r is
    -inf where bit c % 32 of word c // 32 is 0) then torch.argmax: random masks, a row all
    allowed (-1 words), a row with only its last column allowed, a row with none (index 0,
    as torch on all -inf), NaN masked out and allowed, a mask wider than the row."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(6, n, generator=gen)
    words = -(-n // 32) + 2
    bitmask = torch.randint(-2**31, 2**31 - 1, (6, words), generator=gen, dtype=torch.int64).to(torch.int32)
    bitmask[1] = -1
    bitmask[2] = 0
    last_bit = (1 << ((n - 1) % 32)) - (1 << 32 if (n - 1) % 32 == 31 else 0)   # as an int32
    bitmask[2, (n - 1) // 32] = last_bit
    bitmask[3] = 0
    x[4, 0] = float("nan")
    bitmask[4, 0] &= ~1
    if n > 1:
        x[5, n - 1] = float("nan")
        bitmask[5, (n - 1) // 32] |= last_bit
    bits = (bitmask.to(torch.int64)[:, :, None] >> torch.arange(32)) & 1   # [rows, words, 32]
    allowed = bits.reshape(6, -1)[:, :n].bool()
    for dtype in DTYPES:
        xd = x.to(dtype)
        expected = xd.float().masked_fill(~allowed, float("-inf")).argmax(dim=-1)
        assert torch.equal(argmax_rows(xd.to(DEVICE), bitmask.to(DEVICE)).cpu(), expected), dtype
    assert int(expected[2]) == n - 1 and int(expected[3]) == 0
    with pytest.raises(ValueError):   # too narrow a mask, or one of other rows
        argmax_rows(x.to(DEVICE), bitmask[:, :max(1, n // 32 - 1)].to(DEVICE) if n > 64 else bitmask[:5].to(DEVICE))
