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
