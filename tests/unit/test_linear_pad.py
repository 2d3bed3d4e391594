"""linear_ops.PAD_ROWS: a float matmul at a row count where cuBLAS is slow runs on its rows padded
to a larger count (benchmarks/decode_gemm_sweep.py); the padding rows must change nothing."""
import pytest
import torch
import torch.nn.functional as F

from pagedserve.layers import linear_ops
from pagedserve.layers.linear_ops import PAD_ROWS, linear, padded_linear


def test_table_pads_upward_past_the_gemv():
    for (m, n, k), rows in PAD_ROWS.items():
        assert linear_ops.GEMV_MAX_ROWS < m < rows, (m, n, k, rows)
        assert n > 0 and k > 0


def test_padded_rows_change_nothing(monkeypatch):
    """The buffer's padding rows hold NaN here: each output row still equals F.linear's."""
    real_new_empty = torch.Tensor.new_empty

    def nan_empty(self, *size, **kw):
        return real_new_empty(self, *size, **kw).fill_(float("nan"))

    monkeypatch.setattr(torch.Tensor, "new_empty", nan_empty)
    torch.manual_seed(0)
    x, w = torch.randn(80, 64), torch.randn(96, 64)
    y = padded_linear(x, w, 128)
    assert y.shape == (80, 96) and y.is_contiguous()
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_cpu_never_pads(monkeypatch):
    monkeypatch.setitem(PAD_ROWS, (80, 96, 64), 128)
    monkeypatch.setattr(linear_ops, "padded_linear", lambda *a: pytest.fail("padded on the CPU"))
    x, w = torch.randn(80, 64), torch.randn(96, 64)
    assert torch.equal(linear(x, w), F.linear(x, w))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the padded path runs on CUDA only")
def test_cuda_pads_named_shapes(monkeypatch):
    calls = []
    real = linear_ops.padded_linear
    monkeypatch.setattr(linear_ops, "padded_linear", lambda x, w, rows: calls.append(rows) or real(x, w, rows))
    monkeypatch.setitem(PAD_ROWS, (80, 96, 64), 128)
    x = torch.randn(80, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(96, 64, device="cuda", dtype=torch.bfloat16)
    y = linear(x, w)
    assert calls == [128] and y.shape == (80, 96)
    torch.testing.assert_close(y.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2)
    linear(torch.randn(81, 64, device="cuda", dtype=torch.bfloat16), w)   # not in the table
    assert calls == [128]
