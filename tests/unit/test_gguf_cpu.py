"""The C++ GGUF kernels (gguf_cpu.cpp) against the dequantize-then-fp32 reference, every type:
GEMV within fp32 rounding (relative to sum |x| |w|), the fused RMSNorm / SiLU-and-mul
prologues against the torch ops, dequantize (fp32 within one rounding, bf16 = RNE of it)."""
import pytest
import torch

from pagedserve.layers.quantization import gguf_cpu
from pagedserve.layers.quantization.gguf_kernels import FORMATS, dequantize
from tests.unit.test_gguf_kernels import random_blocks

pytest.importorskip("gguf")
if gguf_cpu.extension() is None:
    pytest.skip("no C++ compiler for the GGUF CPU kernels", allow_module_level=True)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("rows", [1, 3, 4, 7])
def test_gemv_matches_dequantized_fp32(fmt, rows):
    raw = torch.from_numpy(random_blocks(fmt, 96, 512, seed=1))
    w = dequantize(raw, fmt).double()
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    out = gguf_cpu.gemv(x, raw, fmt)
    assert out.dtype == torch.float32 and out.shape == (rows, 96)
    bound = x.double().abs() @ w.abs().t()
    assert ((out.double() - x.double() @ w.t()).abs() / bound).max() < 1e-6


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_dequantize(fmt):
    raw = torch.from_numpy(random_blocks(fmt, 16, 512, seed=2))
    ref = dequantize(raw, fmt)
    assert torch.allclose(gguf_cpu.dequantize(raw, fmt), ref, rtol=1e-6, atol=0)
    assert torch.equal(gguf_cpu.dequantize(raw, fmt, torch.bfloat16), ref.bfloat16())


def test_fused_prologues():
    raw = torch.from_numpy(random_blocks("Q4_1", 64, 256, seed=3))
    w = dequantize(raw, "Q4_1")
    x, res, g = torch.randn(2, 256), torch.randn(2, 256), torch.rand(256) + 0.5
    out, h = gguf_cpu.gemv_normed(x, res, g, 1e-5, raw, "Q4_1")
    ref_h = x + res
    normed = g * (ref_h * torch.rsqrt(ref_h.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(h, ref_h)
    assert torch.allclose(out, normed @ w.t(), rtol=1e-4, atol=1e-4)
    raw_down = torch.from_numpy(random_blocks("Q8_0", 32, 128, seed=4))
    gate_up = torch.randn(3, 256)
    ref = torch.nn.functional.silu(gate_up[:, :128]) * gate_up[:, 128:] @ dequantize(raw_down, "Q8_0").t()
    assert torch.allclose(gguf_cpu.gemv_silu(gate_up, raw_down, "Q8_0"), ref, rtol=1e-4, atol=1e-4)


def test_decode_attention_matches_the_torch_path():
    """Rotary, KV store and paged attention of an all-decode step against RotaryEmbedding,
    store_kv_ref and paged_attention_ref (GQA, scattered blocks, one padded slot)."""
    from pagedserve.attention.torch_ref import paged_attention_ref, store_kv_ref
    from pagedserve.layers.rotary import RotaryEmbedding
    gen = torch.Generator().manual_seed(5)
    hq, hkv, d, block, blocks = 6, 2, 64, 16, 12
    seq_lens = torch.tensor([1, 37, 16, 20], dtype=torch.int32)
    tables = torch.randperm(blocks, generator=gen)[:12].view(4, 3).int()
    slots = torch.stack([tables[s, (n - 1) // block] * block + (n - 1) % block for s, n in enumerate(seq_lens)]).long()
    slots[3] = -1   # padding: not stored (its context is what the cache holds)
    positions = (seq_lens - 1).long()
    rope = RotaryEmbedding(d, 256, 10000.0)
    qkv = torch.randn(4, (hq + 2 * hkv) * d, generator=gen)
    q, k, v = (t.view(4, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))   # strided views, as the model's
    k_cache = torch.randn(blocks, block, hkv, d, generator=gen)
    v_cache = torch.randn(blocks, block, hkv, d, generator=gen)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    rq, rk = rope(positions, q, k)
    store_kv_ref(rk, v, ref_k, ref_v, slots)
    ref = paged_attention_ref(rq, ref_k, ref_v, tables, seq_lens, torch.arange(5, dtype=torch.int32), d ** -0.5)
    out = gguf_cpu.decode_attention(q, k, v, k_cache, v_cache, tables, seq_lens, slots, positions, rope.cos_cache,
                                    rope.sin_cache, d ** -0.5)
    assert torch.allclose(k_cache, ref_k, rtol=1e-6, atol=1e-6) and torch.equal(v_cache, ref_v)
    assert torch.allclose(out, ref.reshape(4, hq * d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_stack_equals_the_modules(monkeypatch, threads):
    """gguf_cpu.decode_stack (one C++ call for all decoder layers of an all-decode step, one
    team of threads) against the same layers run module by module, on the default model, at
    one and two threads: bit-identical logprobs."""
    import pagedserve.models.llama as llama
    from pagedserve import LLM, SamplingParams
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        llm = LLM(max_model_len=256, num_kv_blocks=64, max_num_seqs=4, enable_prefix_caching=False)
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
        prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
        fused, calls = llama.cpu_decode_stack, []

        def counted(*args):
            out = fused(*args)
            calls.append(out is not None)
            return out

        def run():
            return [[(t, {k: v.logprob for k, v in lp.items()}) for t, lp in zip(o.outputs[0].token_ids,
                                                                                  o.outputs[0].logprobs)]
                    for o in llm.generate(prompts, params, use_tqdm=False)]
        monkeypatch.setattr(llama, "cpu_decode_stack", counted)
        fast = run()
        monkeypatch.setattr(llama, "cpu_decode_stack", lambda *args: None)
        slow = run()
    finally:
        torch.set_num_threads(before)
    assert sum(calls) >= 11   # every decode step
    assert fast == slow
