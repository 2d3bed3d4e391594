"""The CPU backend's step attention (torch_ref.StepPlan) against the masked reference
(paged_attention_ref): a prefill chunk of CHUNK_SPLIT_MIN_QUERY tokens or more takes two flash
calls with no mask, merged by their log-sum-exp (chunk_attention); the decodes and shorter chunks
stay masked calls."""
from __future__ import annotations

import pytest
import torch

from pagedserve.attention.torch_ref import CHUNK_SPLIT_MIN_QUERY, StepPlan, cpu_flash_with_lse, paged_attention_ref
from tests.paged_batch import make_batch

BLOCK = 16
CPU = torch.device("cpu")


def _batch(dtype: torch.dtype, cache_dtype: torch.dtype, heads: int, kv_heads: int, context: list[int],
           query: list[int], seed: int = 0):
    """tests/paged_batch.make_batch on the CPU (its padding rows left out), the cache in cache_dtype."""
    batch = make_batch(query, context, heads, kv_heads, 64, BLOCK, dtype, seed, device=CPU)
    q = batch.query[:int(batch.query_start_loc[-1])]
    k_cache, v_cache = batch.k_cache.to(cache_dtype), batch.v_cache.to(cache_dtype)
    return q, k_cache, v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc


@pytest.mark.parametrize("dtype,cache_dtype,heads,kv_heads,tolerance", [
    (torch.float32, torch.float32, 9, 3, 2e-6),            # the default model's GQA
    (torch.float32, torch.float32, 4, 4, 2e-6),
    (torch.bfloat16, torch.bfloat16, 8, 2, 1.6e-2),        # one bf16 rounding of the output
    (torch.float32, torch.float8_e4m3fn, 8, 2, 2e-6),      # kv_cache_dtype fp8: K/V read back as fp32
])
def test_chunks_without_a_mask_equal_the_masked_reference(dtype, cache_dtype, heads, kv_heads, tolerance):
    # two decodes, a short chunk after cached context (masked), a fresh prompt, a chunk whose context
    # ends mid-block
    context, query = [20, 33, 40, 0, 75], [1, 1, CHUNK_SPLIT_MIN_QUERY - 1, CHUNK_SPLIT_MIN_QUERY, 300]
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc = _batch(dtype, cache_dtype, heads, kv_heads,
                                                                          context, query)
    plan = StepPlan(block_tables, seq_lens, query_start_loc, torch.full((q.shape[0],), -1), 2, BLOCK)
    assert cpu_flash_with_lse() is not None   # torch >= 2.5 on the CPU: the chunks take chunk_attention
    assert [group[5] is None for group in plan.groups] == [False, False, True, True]
    assert [(group[0], group[1]) for group in plan.groups] == [(0, 2), (2, 257), (257, 513), (513, 813)]
    got = plan.attend(q, k_cache, v_cache, 0.125)
    want = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, 0.125)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert (got.float() - want.float()).abs().max().item() <= tolerance


def test_without_the_op_the_chunks_keep_the_mask(monkeypatch):
    """A torch whose CPU flash op lacks the log-sum-exp or GQA: every group masked, same result."""
    import pagedserve.attention.torch_ref as torch_ref
    monkeypatch.setattr(torch_ref, "cpu_flash_with_lse", lambda: None)
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc = _batch(torch.float32, torch.float32, 9, 3,
                                                                          [5, 40], [1, 300], seed=1)
    plan = StepPlan(block_tables, seq_lens, query_start_loc, torch.full((q.shape[0],), -1), 1, BLOCK)
    assert all(group[5] is not None for group in plan.groups)
    want = paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, 0.125)
    assert torch.allclose(plan.attend(q, k_cache, v_cache, 0.125), want, atol=2e-6, rtol=0)


def test_mixed_step_decodes_take_the_decode_kernel(monkeypatch):
    """GGUF packed on the CPU (TorchBackend with gguf_cpu.decode_attention): in a mixed step the
    decodes take the C++ kernel, the chunks the plan; outputs and caches equal the backend without
    the kernel (rotary, store, the masked decode group)."""
    from pagedserve.attention.backend import TorchBackend
    from pagedserve.attention.metadata import AttentionMetadata
    from pagedserve.layers.quantization import gguf_cpu
    from pagedserve.layers.rotary import RotaryEmbedding
    if gguf_cpu.extension() is None:
        pytest.skip("the C++ kernels did not build here (no compiler)")
    context, query = [20, 33, 75, 0, 40], [1, 1, 1, CHUNK_SPLIT_MIN_QUERY, 9]
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc = _batch(torch.float32, torch.float32, 9, 3,
                                                                          context, query, seed=2)
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(q.shape[0], 3, 64, generator=gen), torch.randn(q.shape[0], 3, 64, generator=gen)
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(context, query)])
    slots = torch.tensor([int(block_tables[s, p // BLOCK]) * BLOCK + p % BLOCK
                          for s, (c, n) in enumerate(zip(context, query)) for p in range(c, c + n)])
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=query_start_loc, seq_lens=seq_lens,
                             block_tables=block_tables, max_query_len=max(query), max_seq_len=int(seq_lens.max()),
                             num_decodes=3, num_decode_tokens=3)
    rope = RotaryEmbedding(64, 4096, 10000.0)
    calls = []

    def kernel(*args):
        calls.append(args[0].shape[0])
        return gguf_cpu.decode_attention(*args)

    results = []
    for backend in (TorchBackend(kernel), TorchBackend()):
        kc, vc = k_cache.clone(), v_cache.clone()
        out = backend.decode(q, k, v, kc, vc, meta, 0.125, (rope, positions))
        if out is None:   # no kernel: the layer's own way (layers/attention.py)
            rq, rk = rope(positions, q, k)
            backend.store_kv(rk, v, kc, vc, slots, meta)
            out = backend.attend(rq, rk, v, kc, vc, meta, 0.125).flatten(1)
        results.append((out, kc, vc))
    assert calls == [3]   # the three decodes, once
    (got, got_k, got_v), (want, want_k, want_v) = results
    assert torch.allclose(got_k, want_k, atol=1e-6, rtol=0) and torch.equal(got_v, want_v)
    assert got.shape == want.shape == (q.shape[0], 9 * 64)
    assert (got - want).abs().max().item() <= 2e-5


def test_fp32_checkpoint_decodes_through_the_kernel_with_transformers_ids(tmp_path, monkeypatch):
    """A safetensors checkpoint in fp32 on the CPU: select_backend gives the generative model the C++
    decode kernel (and an encoder's pooling none); a batch's decodes, mixed steps among them, go
    through it, and the greedy ids equal transformers'."""
    from pagedserve import LLM, SamplingParams
    from pagedserve.attention.backend import select_backend
    from pagedserve.layers.quantization import gguf_cpu
    from tests.helpers import hf_greedy, random_prompts, write_tiny_checkpoint
    if gguf_cpu.extension() is None:
        pytest.skip("the C++ kernels did not build here (no compiler)")
    assert select_backend(CPU).decode_kernel is gguf_cpu.decode_attention
    assert select_backend(CPU, decodes=False).decode_kernel is None
    rows = []
    kernel = gguf_cpu.decode_attention
    monkeypatch.setattr(gguf_cpu, "decode_attention", lambda q, *rest: rows.append(q.shape[0]) or kernel(q, *rest))
    path = write_tiny_checkpoint(str(tmp_path / "llama"), "llama")
    prompts = random_prompts(4, 256, 5, 40, seed=7)
    llm = LLM(model=path, device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=128,
              max_num_batched_tokens=32)   # prompts chunked: later prompts' chunks share steps with decodes
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
    from transformers import AutoModelForCausalLM
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(reference, p, 8) for p in prompts]
    layers = reference.config.num_hidden_layers
    assert len(rows) % layers == 0 and sum(rows) == 4 * 7 * layers   # each decode token of each layer, once
