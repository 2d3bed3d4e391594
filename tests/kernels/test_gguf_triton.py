"""The GGUF block kernels (pagedserve/layers/quantization/triton_gguf.py) against the torch
reference (gguf_kernels.dequantize, itself checked against gguf.quants.dequantize here): the
dequantization bit for bit, the GEMV and the prefill path within one rounding of the output,
for every type gguf.py keeps packed on CUDA (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K);
the kernels compiled for sm_90 on the CPU; gguf.py's routing; a tiny random Llama of each type
loaded packed gives the dequantized model's greedy ids."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from pagedserve.layers.quantization import triton_gguf  # noqa: E402
from pagedserve.layers.quantization.gguf_kernels import FORMATS, dequantize as torch_dequantize  # noqa: E402
from pagedserve.layers.quantization.triton_w4a16_gemv import GemvConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's CPU interpreter mishandles bfloat16 loads/stores: bf16 runs on the GPU machine only.
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TYPES = ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
# fp16 fields per type: the scale d first, then Q4_1 / Q5_1's m or the K-quants' dmin
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
               "Q5_K": (0, 2), "Q6_K": (208,)}
# small launches so that K spans several tiles / splits and N leaves a ragged last block
SMALL_FMA = GemvConfig(block_n=16, num_warps=4, num_stages=2, programs_per_sm=4)
SMALL_DOT = GemvConfig(block_n=16, num_warps=4, num_stages=2, programs_per_sm=4, dot=True, block_m=16)


def random_blocks(fmt: str, n: int, kb: int, seed: int, scale: float = 0.02) -> torch.Tensor:
    """Raw blocks [n, kb, block_bytes] with random quants (and K-quant sub-block scales) and sane
    fp16 scales (d ~ U[0.05, 1.05] * scale, Q4_1 / Q5_1's m ~ -10 scale * U[0, 1], the K-quants'
    dmin as d)."""
    gen = torch.Generator().manual_seed(seed)
    nbytes = FORMATS[fmt].nbytes
    raw = torch.randint(0, 256, (n, kb, nbytes), generator=gen, dtype=torch.uint8)
    at = FP16_FIELDS[fmt]
    d = (torch.rand(n, kb, 1, generator=gen) * scale + scale / 20).to(torch.float16)
    raw[..., at[0]:at[0] + 2] = d.view(torch.uint8)
    if len(at) > 1:
        m = (-torch.rand(n, kb, 1, generator=gen) * 10 * scale if fmt in ("Q4_1", "Q5_1")
             else torch.rand(n, kb, 1, generator=gen) * scale + scale / 20).to(torch.float16)
        raw[..., at[1]:at[1] + 2] = m.view(torch.uint8)
    return raw


def values_per_block(fmt: str) -> int:
    return FORMATS[fmt].elems


@pytest.mark.parametrize("fmt", TYPES)
def test_torch_reference_matches_gguf_package(fmt: str) -> None:
    """The reference these tests use is the block format as the gguf package reads it."""
    quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType
    raw = random_blocks(fmt, 5, 3, seed=1)
    ref = quants.dequantize(raw.reshape(5, -1).numpy(), GGMLQuantizationType[fmt])
    assert np.array_equal(torch_dequantize(raw, fmt).numpy(), ref.astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", TYPES)
def test_dequantize_bit_exact(fmt: str, dtype: torch.dtype) -> None:
    raw = random_blocks(fmt, 37, 5, seed=2)
    out = triton_gguf.dequantize(raw.to(DEVICE), fmt, dtype)
    assert out.dtype == dtype and out.shape == (37, 5 * values_per_block(fmt))
    assert torch.equal(out.cpu(), torch_dequantize(raw, fmt, dtype))


def _reference(x: torch.Tensor, raw: torch.Tensor, fmt: str) -> torch.Tensor:
    return (x.double() @ torch_dequantize(raw, fmt).double().T)


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32 accumulation and one rounding: within an ulp or two of x's dtype of the exact sum."""
    assert out.dtype == dtype and out.shape == ref.shape
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", TYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 37])
def test_gemv(fmt: str, m: int, dtype: torch.dtype) -> None:
    """Odd N (a ragged last column block), K of 1-3 blocks beyond a tile (split over programs;
    the K-quants: 1-3 super-blocks of 8 or 16 units)."""
    shapes = ((37, 1, 3), (53, 3, 4), (21, 9, 5)) if values_per_block(fmt) == 32 else ((37, 1, 3), (21, 3, 5))
    for n, kb, seed in shapes:
        raw = random_blocks(fmt, n, kb, seed=seed + m)
        x = torch.randn(m, kb * values_per_block(fmt), generator=torch.Generator().manual_seed(seed)).to(dtype)
        config = SMALL_FMA if m == 1 else SMALL_DOT
        out = triton_gguf.gemv(x.to(DEVICE), raw.to(DEVICE), fmt, config)
        _close(out, _reference(x, raw, fmt), dtype)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32])
@pytest.mark.parametrize("fmt", TYPES)
@pytest.mark.parametrize("m", [1, 16])
def test_gemv_multiplies_the_weights_rounded_to_x_dtype(fmt: str, m: int, dtype: torch.dtype) -> None:
    """The GEMV multiplies the weights the prefill path's dequantization stores (rounded to x's
    dtype, as transformers' GGUF loading rounds them): its outputs are the exact products with
    those weights rounded once, but for the odd near-tie of fp32 accumulation. The two references
    (rounded and unrounded weights) differ in 35-65% of these outputs, and the GEMV before session
    14 (integers times x, scaled per unit: unrounded) matched the rounded one in only those."""
    raw = random_blocks(fmt, 64, 8 if values_per_block(fmt) == 32 else 1, seed=11)
    x = torch.randn(m, raw.shape[1] * values_per_block(fmt), generator=torch.Generator().manual_seed(11)).to(dtype)
    out = triton_gguf.gemv(x.to(DEVICE), raw.to(DEVICE), fmt).cpu()
    rounded = (x.double() @ torch_dequantize(raw, fmt, dtype).double().T).to(dtype)
    unrounded = (x.double() @ torch_dequantize(raw, fmt).double().T).to(dtype)
    assert (rounded != unrounded).float().mean() > 0.1   # the check below can tell them apart
    assert (out != rounded).float().mean() <= 0.03
    torch.testing.assert_close(out, rounded, rtol=2 ** -7, atol=0)   # the odd miss by one ulp, no more


@pytest.mark.parametrize("fmt", TYPES)
def test_gemv_default_launch_and_rows_independent(fmt: str) -> None:
    """The default launches; a row's result does not depend on the rows beside it (FMA one row
    against the same row inside a tl.dot of 16, fp32 x: both exact to fp32 rounding)."""
    raw = random_blocks(fmt, 70, 4, seed=6).to(DEVICE)
    x = torch.randn(16, 4 * values_per_block(fmt), generator=torch.Generator().manual_seed(6)).to(DEVICE, torch.float16)
    many = triton_gguf.gemv(x, raw, fmt)
    one = triton_gguf.gemv(x[5:6], raw, fmt)
    _close(many, _reference(x.cpu(), raw.cpu(), fmt), torch.float16)
    _close(one, _reference(x[5:6].cpu(), raw.cpu(), fmt), torch.float16)


@pytest.mark.parametrize("fmt", TYPES)
def test_matmul_prefill_rows_is_dequantize_then_matmul(fmt: str) -> None:
    """More than GEMV_MAX_ROWS rows: the weight dequantized to x's dtype, then one matmul:
    exactly x @ reference.to(dtype).T; fewer rows take the GEMV; leading dims kept."""
    raw = random_blocks(fmt, 45, 3, seed=7)
    half = triton_gguf.GEMV_MAX_ROWS // 2 + 3
    x = torch.randn(2, half, 3 * values_per_block(fmt), generator=torch.Generator().manual_seed(7)).to(torch.float16)
    out = triton_gguf.matmul(x.to(DEVICE), raw.to(DEVICE), fmt)
    assert out.shape == (2, half, 45)
    expected = x.to(DEVICE) @ torch_dequantize(raw, fmt, torch.float16).to(DEVICE).T
    assert torch.equal(out, expected)
    small = triton_gguf.matmul(x[0, :3].to(DEVICE), raw.to(DEVICE), fmt)
    assert torch.equal(small, triton_gguf.gemv(x[0, :3].to(DEVICE), raw.to(DEVICE), fmt))


def test_rejects_bad_input() -> None:
    raw = random_blocks("Q4_1", 8, 2, seed=8).to(DEVICE)
    x = torch.zeros(1, 64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="Q2_K"):
        triton_gguf.gemv(x, raw, "Q2_K")
    with pytest.raises(ValueError, match="qweight"):
        triton_gguf.gemv(x, raw, "Q8_0")
    with pytest.raises(ValueError, match="x must be"):
        triton_gguf.gemv(torch.zeros(1, 32, dtype=torch.float16, device=DEVICE), raw, "Q4_1")


_COMPILE_FOR_SM90 = """
from pagedserve.layers.quantization.triton_gguf import _gguf_gemv_kernel, _gguf_dequant_kernel
from pagedserve.layers.quantization.triton_gguf import LAYOUTS, _constants
types = dict(x_ptr="*bf16", qw_ptr="*u8", hw_ptr="*fp16", y_ptr="*fp32", w_ptr="*bf16")
for fmt in LAYOUTS:
    c = _constants(fmt)
    for block_m in (1, 16):
        build(_gguf_gemv_kernel, dict(c, BLOCK_M=block_m, BLOCK_N=64, IEEE=False, NUM_STAGES=3),
              types, num_warps=4, num_stages=3)
    build(_gguf_gemv_kernel, dict(c, BLOCK_M=16, BLOCK_N=64, IEEE=True, NUM_STAGES=3),
          dict(types, x_ptr="*fp32"), num_warps=4, num_stages=3)
    build(_gguf_dequant_kernel, dict(c, BLOCK_N=64, UNITS=128 // c["VB"]), types)
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU tests compile these kernels for the device itself")
def test_kernels_compile_for_sm90() -> None:
    """Every kernel variant to a cubin for sm_90 (tests/kernels/sm90_compile.py)."""
    pytest.importorskip("triton.backends.nvidia")
    from tests.kernels.sm90_compile import run
    proc = run(_COMPILE_FOR_SM90)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_gguf_layers_route_to_the_kernels(monkeypatch) -> None:
    """gguf.py's CUDA routing, run here through the interpreter (the device check forced): a fused
    QKV layer (Q4_1) and a row layer (Q8_0) keep their blocks and multiply through
    triton_gguf.matmul (GEMV rows and prefill rows); the Q8_0 embedding looks rows up exactly and
    its logits take the kernels too. The predicate itself: CUDA, every type, not the
    exact fp32 path."""
    from pagedserve.layers.embedding import ParallelLMHead
    from pagedserve.layers.linear import QKVParallelLinear, RowParallelLinear
    from pagedserve.layers.quantization import gguf
    monkeypatch.setattr(gguf, "CUDA_PACKED", True)   # PAGEDSERVE_GGUF_CUDA_PACKED=1
    for fmt in triton_gguf.TYPE_IDS:
        assert gguf._cuda_packed(torch.device("cuda"), fmt, True) == (fmt in gguf.CUDA_PACKED_TYPES)
    assert not gguf._cuda_packed(torch.device("cuda"), "Q8_0", False)
    assert not gguf._cuda_packed(torch.device("cpu"), "Q8_0", True)
    assert set(gguf.CUDA_PACKED_TYPES) <= set(triton_gguf.TYPE_IDS)
    monkeypatch.setattr(gguf, "_cuda_packed", lambda device, fmt, int4: int4 and fmt in TYPES)
    types = {f"l.self_attn.{p}.qweight": "Q4_1" for p in ("q_proj", "k_proj", "v_proj")}
    types["l.self_attn.o_proj.qweight"] = "Q8_0"
    types["model.embed_tokens.qweight"] = "Q8_0"
    config = gguf.GGUFConfig(types)
    qkv = QKVParallelLinear(64, 16, 4, 2, quant_config=config, prefix="l.self_attn.qkv_proj")
    o = RowParallelLinear(64, 64, quant_config=config, prefix="l.self_attn.o_proj")
    shards = {"q": random_blocks("Q4_1", 64, 2, 11), "k": random_blocks("Q4_1", 32, 2, 12),
              "v": random_blocks("Q4_1", 32, 2, 13)}
    for shard_id, raw in shards.items():
        qkv.weight_loader(qkv.qweight, raw, shard_id)
    o_raw = random_blocks("Q8_0", 64, 2, 14)
    o.weight_loader(o.qweight, o_raw)
    method = config.get_embedding_method("model.embed_tokens")
    embed = ParallelLMHead(96, 64, torch.float32, method)
    e_raw = random_blocks("Q8_0", 96, 2, 15)
    embed.weight_loader(embed.qweight, e_raw)
    for layer in (qkv, o):
        layer.to(DEVICE)
        layer.quant_method.process_weights_after_loading(layer)
    embed.to(DEVICE)
    method.process_weights_after_loading(embed)
    gen = torch.Generator().manual_seed(16)
    for layer, weight in ((qkv, torch.cat([torch_dequantize(r, "Q4_1") for r in shards.values()])),
                          (o, torch_dequantize(o_raw, "Q8_0"))):
        assert layer.gguf_triton and not hasattr(layer, "weight") and layer.qweight.dtype == torch.uint8
        for rows in (1, 5, triton_gguf.GEMV_MAX_ROWS + 3):
            x = torch.randn(rows, 64, generator=gen)
            _close(layer(x.to(DEVICE)), _reference(x, layer.qweight.cpu(), layer.quant_method.fmt), torch.float32)
        torch.testing.assert_close(layer(x.to(DEVICE)).cpu(), x @ weight.t(), rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[3, 95], [0, 3]])
    weight = torch_dequantize(e_raw, "Q8_0")
    assert embed.gguf_triton and torch.equal(embed.quant_method.embed(embed, ids.to(DEVICE)).cpu(), weight[ids])
    hidden = torch.randn(2, 64, generator=gen)
    _close(embed.quant_method.logits(embed, hidden.to(DEVICE)), _reference(hidden, e_raw, "Q8_0"), torch.float32)


def test_cuda_packing_is_opt_in() -> None:
    """On CUDA GGUF layers are dequantized once at load unless PAGEDSERVE_GGUF_CUDA_PACKED=1 asks
    for the blocks to stay (the packed GEMV is slower and rounds differently: benchmarks/RESULTS.md)."""
    code = ("import importlib, os; from pagedserve.layers.quantization import gguf; import torch; "
            "cuda = torch.device('cuda'); before = gguf._cuda_packed(cuda, 'Q4_1', True); "
            "os.environ['PAGEDSERVE_GGUF_CUDA_PACKED'] = '1'; importlib.reload(gguf); "
            "print(before, gguf._cuda_packed(cuda, 'Q4_1', True))")
    env = {k: v for k, v in os.environ.items() if k != "PAGEDSERVE_GGUF_CUDA_PACKED"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "True"]


def test_cuda_packs_only_small_layers(monkeypatch) -> None:
    """A layer of more than CUDA_PACKED_MAX_ELEMENTS weights is dequantized once on CUDA (its
    product then cuBLAS's, faster there on the H200); one at the limit keeps its blocks."""
    from pagedserve.layers.linear import RowParallelLinear
    from pagedserve.layers.quantization import gguf
    monkeypatch.setattr(gguf, "_cuda_packed", lambda device, fmt, int4: int4 and fmt in TYPES)
    monkeypatch.setattr(gguf, "CUDA_PACKED_MAX_ELEMENTS", 64 * 64)
    for rows, packed in ((64, True), (96, False)):
        config = gguf.GGUFConfig({"l.o_proj.qweight": "Q4_1"})
        layer = RowParallelLinear(64, rows, quant_config=config, prefix="l.o_proj")
        blocks = random_blocks("Q4_1", rows, 2, 21)
        layer.weight_loader(layer.qweight, blocks)
        layer.to(DEVICE)
        layer.quant_method.process_weights_after_loading(layer)
        assert layer.gguf_triton == packed
        if not packed and DEVICE != "cuda":   # on the CPU it takes the C++ kernels (Q8 activations)
            continue
        assert hasattr(layer, "weight") != packed
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(22))
        torch.testing.assert_close(layer(x.to(DEVICE)).float().cpu(), x @ torch_dequantize(blocks, "Q4_1").t(),
                                   rtol=1e-5, atol=1e-5)


def model_blocks(fmt: str, n: int, kb: int, seed: int, std: float) -> torch.Tensor:
    """Raw blocks whose values have mean ~0 and rms ~std (a random model that is not degenerate:
    random_blocks' types with an offset give weights of one sign, whose products swamp the
    tokens): random quants, d drawn around std / rms(q), Q4_1 / Q5_1's m = -d * mid-q, the
    K-quants' sub-block scales in 1..8 (Q5_K 1..4) with mins = round(scale * mid-q) and dmin = d."""
    gen = torch.Generator().manual_seed(seed + 1000)
    raw = random_blocks(fmt, n, kb, seed)   # the quants (and Q6_K's int8 scales) stay random
    mid, rms = {"Q4_0": (0, 4.6), "Q4_1": (7.5, 4.6), "Q8_0": (0, 74), "Q5_0": (0, 9.2), "Q5_1": (15.5, 9.2),
                "Q4_K": (7.5, 4.6), "Q5_K": (15.5, 9.2), "Q6_K": (0, 74 * 18.5)}[fmt]
    if fmt in ("Q4_K", "Q5_K"):   # 8 scales and 8 mins of 6 bits in 12 bytes (get_scale_min_k4's inverse)
        sc = torch.randint(1, 9 if fmt == "Q4_K" else 5, (n, kb, 8), generator=gen)
        mn = (sc * mid).round().long()
        s = torch.empty(n, kb, 12, dtype=torch.long)
        s[..., 0:4] = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
        s[..., 4:8] = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
        s[..., 8:12] = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
        raw[..., 4:16] = s.to(torch.uint8)
        rms *= sc.float().pow(2).mean().sqrt().item()
    d = (std / rms * (0.5 + torch.rand(n, kb, 1, generator=gen))).to(torch.float16)
    at = FP16_FIELDS[fmt]
    raw[..., at[0]:at[0] + 2] = d.view(torch.uint8)
    if len(at) > 1:   # Q4_1 / Q5_1's m, the K-quants' dmin
        second = d if fmt.endswith("_K") else (-mid * d.float()).to(torch.float16)
        raw[..., at[1]:at[1] + 2] = second.view(torch.uint8)
    return raw


def write_random_llama(path: str, fmt: str, hidden: int = 256, intermediate: int = 512, layers: int = 2,
                       vocab: int = 512, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> str:
    """A random Llama as pagedserve materializes a GGUF file (loader.materialize_gguf: config.json,
    model.safetensors with every projection and the tied embedding as `fmt`'s raw blocks, fp32
    norms, gguf_quant.json with the types): the loader's input after the GGUF parse. Weights of
    mean ~0 (model_blocks), rms 1 / sqrt(K) in the projections and 0.02 in the embedding (tied: larger,
    a token's own row wins the logits)."""
    import json
    import os
    from safetensors.torch import save_file
    per = values_per_block(fmt)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden // heads * kv_heads, hidden),
              "self_attn.v_proj": (hidden // heads * kv_heads, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
              "mlp.down_proj": (hidden, intermediate)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.qweight": model_blocks(fmt, vocab, hidden // per, seed, 0.02),
               "model.norm.weight": 1 + 0.1 * torch.randn(hidden, generator=gen)}
    for i in range(layers):
        for j, (name, (rows, cols)) in enumerate(shapes.items()):
            tensors[f"model.layers.{i}.{name}.qweight"] = model_blocks(fmt, rows, cols // per, seed + 10 * i + j + 1,
                                                                      cols ** -0.5)
        for name in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{name}.weight"] = 1 + 0.1 * torch.randn(hidden, generator=gen)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
                  intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=hidden // heads, vocab_size=vocab, hidden_act="silu",
                  max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                  attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(path, "gguf_quant.json"), "w") as f:
        json.dump({"quant_method": "gguf", "tensor_types": {k: fmt for k in tensors if k.endswith(".qweight")}}, f)
    return path


@pytest.mark.parametrize("fmt", ["Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])   # the types session 10 added
def test_random_llama_packed_gives_the_dequantized_ids(fmt: str, tmp_path, monkeypatch) -> None:
    """A 1-layer random Llama of `fmt` loaded with its blocks kept (gguf.py's routing forced for
    dtype=float32, which dequantizes otherwise; on the CPU through the interpreter: the GEMV's
    fp32 FMAs / IEEE dots, prefill rows through the Triton dequantize): every projection and the
    tied embedding stay raw blocks, and the greedy ids equal those of the same model dequantized
    to fp32 at load."""
    from pagedserve import LLM, SamplingParams
    from pagedserve.layers.quantization import gguf
    model = write_random_llama(str(tmp_path / fmt), fmt, intermediate=256, layers=1)
    prompts = [{"prompt_token_ids": [5, 77, 301, 12, 9]}, {"prompt_token_ids": list(range(40, 60))}]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, detokenize=False)

    def run() -> tuple[list[list[int]], int]:
        llm = LLM(model=model, device=DEVICE, dtype="float32", max_model_len=64, skip_tokenizer_init=True, seed=0,
                  enforce_eager=True, num_kv_blocks=32)   # small: the GPU run has a test process per type
        packed = sum(bool(getattr(m, "gguf_triton", False)) for m in llm.engine.core.executor.runner.model.modules())
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)], packed

    reference, none = run()   # dtype=float32: dequantized to fp32 at load
    monkeypatch.setattr(gguf, "_cuda_packed", lambda device, f, int4: f in triton_gguf.TYPE_IDS)
    ids, packed = run()
    assert none == 0 and packed == 4 + 1   # qkv, o, gate_up, down; the embedding (= LM head)
    assert ids == reference and all(len(t) == 4 for t in ids) and len({i for t in ids for i in t}) >= 2, ids
