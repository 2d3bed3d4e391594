"""The one-row norm chain (models/llama.py's forward_chained, triton_gemv's add_gemv /
rms_norm_gemv) through a whole model: a tiny fp16 llama decodes one sequence with each residual
add + RMSNorm taken into the gemvs around it (under Triton's interpreter on CPU; natively, in
CUDA graphs, on a GPU) against the same model with norm launches. On a GPU both paths run the
same gemv launches (the tiny shapes put in its table): the same bits; on CPU the unchained path
is torch's ops."""
from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.layers import linear_ops, triton_gemv
from tests.helpers import tiny_config, write_tiny_checkpoint

PROMPT = [5, 17, 301, 42, 7, 99]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _decode(path: str, name: str, chain: bool, monkeypatch) -> tuple[list[int], list[float], LLM]:
    monkeypatch.setattr(linear_ops, "NORM_CHAIN_ON_CPU", True)
    monkeypatch.setattr(linear_ops, "NORM_CHAIN", chain)
    # the tiny model's shapes in the one-row table: unchained, its linears take the same launches
    c = tiny_config(name)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv, h, i = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim, c.hidden_size, c.intermediate_size
    monkeypatch.setattr(triton_gemv, "CONFIGS", {**triton_gemv.CONFIGS, **{
        shape: triton_gemv.GemvConfig(16, 64, 4, 2) for shape in ((q + 2 * kv, h), (h, q), (2 * i, h), (h, i))}})
    llm = LLM(model=path, device=DEVICE, dtype="float16", skip_tokenizer_init=True, max_model_len=64,
              max_logprobs=-1, num_kv_blocks=16)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=-1)
    out = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)[0].outputs[0]
    return list(out.token_ids), [step[t].logprob for step, t in zip(out.logprobs, out.token_ids)], llm


@pytest.mark.parametrize("name", ["llama", "qwen3"])   # qwen3: q / k norms between qkv and the attention
def test_chained_decode_equals_the_norm_launches(tmp_path, monkeypatch, name):
    path = write_tiny_checkpoint(str(tmp_path), name, seed=3)
    ids, logprobs, llm = _decode(path, name, True, monkeypatch)
    model = llm.engine.core.executor.runner.model.model
    # the embedded row's sum of squares, then two a layer; the last step's are still there (the embedding
    # launch sets them first): each layer's second is that of the residual row the next layer (the final
    # norm) takes
    assert model.norm_sums is not None and model.norm_sums.shape == (5,) and bool((model.norm_sums > 0).all())
    llm.shutdown()
    ref_ids, ref_logprobs, ref_llm = _decode(path, name, False, monkeypatch)
    ref_llm.shutdown()
    assert ids == ref_ids
    if DEVICE == "cuda":
        assert logprobs == ref_logprobs
    else:
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_logprobs), rtol=0, atol=2e-2)


def test_a_layer_with_a_bias_does_not_chain(tmp_path, monkeypatch):
    """qwen2's qkv bias: its norms stay launches (the gemv has no bias)."""
    monkeypatch.setattr(linear_ops, "NORM_CHAIN_ON_CPU", True)
    path = write_tiny_checkpoint(str(tmp_path), "qwen2", seed=1)
    llm = LLM(model=path, device=DEVICE, dtype="float16", skip_tokenizer_init=True, max_model_len=64,
              num_kv_blocks=16)
    assert llm.engine.core.executor.runner.model.model.norm_sums is None
    llm.shutdown()
