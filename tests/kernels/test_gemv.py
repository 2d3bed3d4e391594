"""The decode-sized matmul kernel against torch: every row count, ragged N and K."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from pagedserve.layers.triton_gemv import GemvConfig, gemv, use_gemv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's CPU interpreter mishandles bfloat16 loads/stores: bf16 runs on the GPU machine only.
DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _check(m: int, n: int, k: int, dtype: torch.dtype, config: GemvConfig, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(DEVICE, dtype)
    out = gemv(x, w, config)
    assert out.shape == (m, n) and out.dtype == dtype
    ref = (x.float() @ w.float().T).to(dtype)
    # fp32 accumulation, one rounding: at most one ulp of the output dtype from the reference
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16])
def test_gemv_rows(m: int, dtype: torch.dtype) -> None:
    _check(m, 96, 512, dtype, GemvConfig(block_n=32, block_k=128, num_warps=4, num_stages=2), seed=m)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(50, 300), (33, 520), (64, 1024)])
def test_gemv_ragged(n: int, k: int, dtype: torch.dtype) -> None:
    """N not a multiple of the column block, K not a multiple of the K block."""
    _check(2, n, k, dtype, GemvConfig(block_n=16, block_k=128, num_warps=4, num_stages=2), seed=n + k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_default_config(dtype: torch.dtype) -> None:
    _check(1, 40, 1536, dtype, GemvConfig(), seed=7)


def test_use_gemv_only_where_it_pays() -> None:
    """CPU tensors, float32, no rows or more than MAX_ROWS, or a small weight go to F.linear."""
    small = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert not use_gemv(torch.zeros(1, 64, dtype=torch.bfloat16), small)
    if DEVICE == "cuda":
        big = torch.zeros(8192, 2048, dtype=torch.bfloat16, device="cuda")   # 32 MiB
        assert use_gemv(torch.zeros(16, 2048, dtype=torch.bfloat16, device="cuda"), big)
        assert not use_gemv(torch.zeros(17, 2048, dtype=torch.bfloat16, device="cuda"), big)
        assert not use_gemv(torch.zeros(17, 2048, dtype=torch.bfloat16, device="cuda"), big, max_rows=64)
        assert not use_gemv(torch.zeros(0, 2048, dtype=torch.bfloat16, device="cuda"), big)
        assert not use_gemv(torch.zeros(1, 2048, dtype=torch.bfloat16, device="cuda"), big[:4096])


def test_gemv_rejects_bad_input() -> None:
    w = torch.zeros(8, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="rows"):
        gemv(torch.zeros(17, 64, dtype=torch.float16, device=DEVICE), w)
    with pytest.raises(ValueError, match="dtype"):
        gemv(torch.zeros(1, 64, dtype=torch.float32, device=DEVICE), w)
    with pytest.raises(ValueError, match="weight"):
        gemv(torch.zeros(1, 32, dtype=torch.float16, device=DEVICE), w)
