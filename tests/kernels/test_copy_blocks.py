"""copy_blocks (Triton) against indexing: every plane of each pair copied, nothing else touched."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from pagedserve.attention.triton_copy_blocks import copy_blocks  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("dtype,words", [(torch.int64, 3000), (torch.int16, 40)])
def test_copy_blocks_matches_indexing(dtype: torch.dtype, words: int) -> None:
    generator = torch.Generator().manual_seed(words)
    src = torch.randint(-1000, 1000, (6, 7, words), generator=generator).to(DEVICE, dtype)
    dst = torch.randint(-1000, 1000, (6, 5, words), generator=generator).to(DEVICE, dtype)
    src_ids = torch.tensor([6, 0, 3], device=DEVICE)
    dst_ids = torch.tensor([1, 4, 0], device=DEVICE)
    expected = dst.clone()
    expected[:, dst_ids] = src[:, src_ids]
    copy_blocks(src, dst, src_ids, dst_ids)
    assert torch.equal(dst, expected)


def test_copy_blocks_one_pair_from_a_transposed_list() -> None:
    """One (src, dst) pair as the rows of a transposed [1, 2] tensor: each row has one element
    and a stride of 2 (contiguous() keeps it). Failed on an H200 as "not contiguous"."""
    src = torch.arange(2 * 4 * 8, device=DEVICE).view(2, 4, 8)
    dst = torch.zeros(2, 3, 8, dtype=src.dtype, device=DEVICE)
    ids = torch.tensor([[3, 1]], device=DEVICE).t().contiguous()
    assert ids[0].stride(0) == 2
    copy_blocks(src, dst, ids[0], ids[1])
    assert torch.equal(dst[:, 1], src[:, 3]) and not dst[:, 0].any() and not dst[:, 2].any()


def test_copy_blocks_checks_layouts() -> None:
    src = torch.zeros(2, 3, 8, dtype=torch.int64, device=DEVICE)
    ids = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="differ"):
        copy_blocks(src, torch.zeros(2, 3, 4, dtype=torch.int64, device=DEVICE), ids, ids)
    with pytest.raises(ValueError, match="dtype|is torch"):
        copy_blocks(src, torch.zeros(2, 3, 8, dtype=torch.int32, device=DEVICE), ids, ids)
