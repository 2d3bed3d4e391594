"""Decoders as embedding models (worker/pooling_runner.DecoderPoolingRunner, vLLM's pooling runner
on a generative architecture) against transformers: Qwen3-Embedding's layout (a Qwen3ForCausalLM
config over a backbone's flat tensor names, sentence-transformers' last-token pooling and
Normalize) under runner="pooling"; a backbone architecture (MistralModel: e5-mistral's) that is
an embedding model by itself; a full LlamaForCausalLM checkpoint under task="embed" with mean
pooling; the ragged pooling against the padded one for every method; which runner a model gets."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from pagedserve import LLM, SamplingParams
from pagedserve.errors import ValidationError
from pagedserve.models.bert import PoolingConfig, pool, pool_ragged
from tests.helpers import TEST_DEVICE, random_prompts, write_backbone, write_tiny_checkpoint

PROMPTS = [[5, 9, 100, 7], [3], list(range(20, 60)), [400, 401, 402], list(range(300, 317))]


def _hf_hidden(path: str, prompts: list[list[int]]) -> list[torch.Tensor]:
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).last_hidden_state[0] for ids in prompts]


def _vectors(llm: LLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    return [torch.tensor(o.outputs.embedding) for o in llm.embed([{"prompt_token_ids": p} for p in prompts])]


def test_qwen3_embedding_layout_last_token_matches_transformers(tmp_path) -> None:
    path = write_backbone(str(tmp_path), "qwen3", "Qwen3ForCausalLM", pooling="lasttoken")
    llm = LLM(model=path, runner="pooling", skip_tokenizer_init=True, device=TEST_DEVICE, dtype="float32")
    try:
        batched = _vectors(llm, PROMPTS)
        alone = [_vectors(llm, [p])[0] for p in PROMPTS]
    finally:
        llm.shutdown()
    for got, one, hidden in zip(batched, alone, _hf_hidden(path, PROMPTS)):
        want = F.normalize(hidden[-1], dim=-1)
        assert (got - want).abs().max() < 1e-5
        assert (got - one).abs().max() < 1e-6   # a prompt's vector does not depend on its batch
        assert abs(float(got.norm()) - 1.0) < 1e-5


def test_backbone_architecture_is_an_embedding_model_by_itself(tmp_path) -> None:
    """MistralModel (no LM head) with no sentence-transformers files: vLLM's decoder default,
    the last token normalised; asking it to generate is refused naming the flag."""
    path = write_backbone(str(tmp_path), "mistral", "MistralModel", seed=3)
    llm = LLM(model=path, skip_tokenizer_init=True, device=TEST_DEVICE, dtype="float32")
    try:
        got = _vectors(llm, PROMPTS)
    finally:
        llm.shutdown()
    for vector, hidden in zip(got, _hf_hidden(path, PROMPTS)):
        assert (vector - F.normalize(hidden[-1], dim=-1)).abs().max() < 1e-5
    with pytest.raises(ValidationError) as error:
        LLM(model=path, runner="generate", skip_tokenizer_init=True)
    assert error.value.param == "runner" and "cannot generate" in str(error.value)


def test_causal_lm_checkpoint_with_task_embed_mean_pooling(tmp_path) -> None:
    """A whole LlamaForCausalLM checkpoint (model. names, an untied lm_head the runner skips):
    task="embed" makes it an embedding model; without it, it generates as always."""
    path = write_tiny_checkpoint(str(tmp_path), "llama", seed=5)
    write_backbone(str(tmp_path / "st"), "llama", "LlamaForCausalLM", pooling="mean_tokens")
    for name in ("modules.json", "1_Pooling"):
        os.rename(tmp_path / "st" / name, tmp_path / name)
    prompts = random_prompts(6, 512, 1, 40, seed=2)
    llm = LLM(model=path, task="embed", skip_tokenizer_init=True, device=TEST_DEVICE, dtype="float32")
    try:
        got = _vectors(llm, prompts)
    finally:
        llm.shutdown()
    for vector, hidden in zip(got, _hf_hidden(path, prompts)):
        assert (vector - F.normalize(hidden.mean(0), dim=-1)).abs().max() < 1e-5
    generative = LLM(model=path, skip_tokenizer_init=True, device=TEST_DEVICE, dtype="float32")
    try:
        out = generative.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=3, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 3
        with pytest.raises(ValidationError):
            generative.embed(["a"])
    finally:
        generative.shutdown()


@pytest.mark.parametrize("method", ["cls", "last", "mean", "max"])
@pytest.mark.parametrize("normalize", [None, [True, False, True]])
def test_ragged_pooling_equals_the_padded_one(method: str, normalize) -> None:
    torch.manual_seed(0)
    lengths = [3, 1, 5]
    padded = torch.randn(3, 5, 8)
    mask = torch.tensor([[j < n for j in range(5)] for n in lengths])
    ragged = torch.cat([padded[row, :n] for row, n in enumerate(lengths)])
    config = PoolingConfig(method, normalize=True)
    rows = None if normalize is None else torch.tensor(normalize)
    assert torch.allclose(pool_ragged(ragged, lengths, config, rows), pool(padded, mask, config, rows), atol=1e-6)


def test_pooling_runner_refusals(tmp_path) -> None:
    llama = write_tiny_checkpoint(str(tmp_path / "llama"), "llama")
    with pytest.raises(ValidationError) as error:   # the embedded default is a generative GGUF
        LLM(runner="pooling")
    assert error.value.param == "runner"
    with pytest.raises(ValidationError) as error:
        LLM(model=llama, task="embed", tensor_parallel_size=2, skip_tokenizer_init=True)
    assert error.value.param == "tensor_parallel_size"
    window = write_backbone(str(tmp_path / "window"), "mistral", "MistralModel", sliding_window=64)
    llm = LLM(model=window, skip_tokenizer_init=True)   # the window bounds the default length
    try:
        assert llm.engine.max_model_len == 64
    finally:
        llm.shutdown()
    with pytest.raises(ValidationError) as error:
        LLM(model=window, max_model_len=128, skip_tokenizer_init=True)
    assert error.value.param == "max_model_len"
