"""The quantization kernels against the torch reference (Triton's interpreter on CPU, tiny
shapes): the W4A16 GEMV / GEMM / dequantize paths, with and without act-order g_idx, and
per-token activation quantization (int8 exactly; FP8 scales - the interpreter's own fp8
cast rounds differently from the GPU's, which benchmarks/quant_gpu.py checks natively)."""
from __future__ import annotations

import pytest
import torch

from pagedserve.layers.quantization.act_quant import FP8, quantize_per_token_torch
from pagedserve.layers.quantization.int4 import dequantize_int4, pack_int32, unpack_int32
from pagedserve.layers.quantization.triton_act_quant import quantize_per_token_triton
from pagedserve.layers.quantization.triton_w4a16 import w4a16_matmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_pack_round_trips():
    q = torch.randint(0, 16, (64, 24))
    assert torch.equal(unpack_int32(pack_int32(q, 0), 0), q)
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(unpack_int32(pack_int32(q, 1, order), 1, order), q)


@pytest.mark.parametrize("path", ["gemv", "gemm", "dequant"])
@pytest.mark.parametrize("act_order", [False, True])
def test_w4a16_paths_match_the_dequantized_reference(path, act_order):
    torch.manual_seed(0)
    k, n, group = 128, 40, 32
    qweight = pack_int32(torch.randint(0, 16, (k, n)), 0).to(DEVICE)
    scales = (torch.rand(k // group, n) * 0.1).to(DEVICE)
    zeros = torch.randint(0, 16, (k // group, n)).float().to(DEVICE)
    g_idx = (torch.randperm(k) // group).to(torch.int32).to(DEVICE) if act_order else None
    weight = dequantize_int4(qweight, scales, zeros, group, g_idx, torch.float32)
    for rows in (1, 19):
        x = torch.randn(rows, k, device=DEVICE)
        out = w4a16_matmul(x, qweight, scales, zeros, group, g_idx, path)
        torch.testing.assert_close(out, x @ weight, rtol=1e-4, atol=1e-4)


def test_w4a16_launcher_checks_shapes():
    qweight = torch.zeros(16, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="x has K=64 but qweight holds 128 rows"):
        w4a16_matmul(torch.zeros(1, 64), qweight, torch.zeros(4, 8), torch.zeros(4, 8), 32)


def test_per_token_quantization():
    x = torch.randn(5, 300, device=DEVICE) * 3
    x[2] = 0
    q, s = quantize_per_token_triton(x, torch.int8, 127.0, 1e-12)
    ref_q, ref_s = quantize_per_token_torch(x, torch.int8)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    q, s = quantize_per_token_triton(x, FP8, 448.0, 1e-12)
    ref_q, ref_s = quantize_per_token_torch(x, FP8)
    assert torch.equal(s, ref_s) and q.dtype == FP8
    if DEVICE == "cuda":
        assert torch.equal(q.float(), ref_q.float())
