"""GGUF block formats: our torch dequantize equals gguf.quants.dequantize for every type,
and the int4 repack (Q4_0, Q4_1, Q4_K, Q8_0) multiplies like the dequantized weight, both
through torch's int4 kernel (few rows) and the bf16 GEMM on the weight dequantized from the
int4 layout (many rows), which equals the kernel's own weight bit for bit."""
import numpy as np
import pytest
import torch

from pagedserve.layers.quantization.gguf_kernels import FORMATS, dequantize, int4_dequantize, int4_matmul, to_int4

gguf = pytest.importorskip("gguf")

# byte offsets of each type's fp16 scale fields (d, and m / dmin where the type has one)
SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
                 "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(fmt: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bits with sane fp16 scales (no inf / NaN): uint8 [rows, cols / elems, nbytes]."""
    spec = FORMATS[fmt]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // spec.elems, spec.nbytes), dtype=np.uint8)
    for at in SCALE_OFFSETS[fmt]:
        scale = rng.uniform(1e-4, 2e-2, raw.shape[:2]).astype(np.float16)
        raw[..., at:at + 2] = scale.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_dequantize_equals_gguf(fmt):
    raw = random_blocks(fmt, 8, 512)
    ref = gguf.quants.dequantize(raw.reshape(8, -1), gguf.GGMLQuantizationType[fmt])
    ours = dequantize(torch.from_numpy(raw), fmt)
    assert ours.shape == (8, 512)
    assert torch.equal(ours, torch.from_numpy(ref))


@pytest.mark.parametrize("fmt", [f for f in sorted(FORMATS) if FORMATS[f].int4])
@pytest.mark.parametrize("rows, max_rows", [(3, None), (65, None), (65, 64)])
def test_int4_repack_matches_dequantized(fmt, rows, max_rows):
    raw = torch.from_numpy(random_blocks(fmt, 128, 512, seed=1))
    weight = dequantize(raw, fmt)
    x = torch.randn(rows, 512)
    ref = x.bfloat16().float() @ weight.t()
    out = int4_matmul(x, to_int4(raw, fmt), max_rows)   # 65 rows over max_rows 64: the bf16 GEMM
    assert out.dtype == torch.float32 and out.shape == (rows, 128)
    # bf16 scales / zeros and a bf16 output per int4 part: a few bf16 ulps of the result
    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("fmt", [f for f in sorted(FORMATS) if FORMATS[f].int4])
def test_int4_dequantize_is_the_kernels_weight(fmt):
    """x = identity through the kernel gives its weight (one product per output, bf16)."""
    raw = torch.from_numpy(random_blocks(fmt, 192, 256, seed=2))
    for part in to_int4(raw, fmt):
        ours = int4_dequantize(part).permute(1, 0, 2).reshape(256, 192)
        kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(256, dtype=torch.bfloat16), part.packed, 32,
                                                             part.scales_zeros)
        assert torch.equal(ours.bfloat16(), kernel)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_dequantize_stays_on_the_blocks_device(fmt):
    """Every helper tensor is made on the blocks' device (CPU-made shift tensors broke Q5_0 / Q5_1 /
    Q5_K at load on CUDA, session 10's device run): here on the meta device, which refuses a mix."""
    raw = torch.zeros(3, 2, FORMATS[fmt].nbytes, dtype=torch.uint8, device="meta")
    out = dequantize(raw, fmt)
    assert out.device.type == "meta" and out.shape == (3, 2 * FORMATS[fmt].elems)
