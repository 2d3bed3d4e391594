"""Embeddings (models/bert.py, frontend/embedding_engine.py, LLM.embed) against transformers:
the real all-MiniLM-L6-v2 (sentence-transformers: mean pooling, then L2 normalisation), and a
tiny random BertModel without sentence-transformers files (CLS, normalised: vLLM's default);
a prompt's vector does not depend on the batch it runs in (padding is masked); the limits and
the batches the engine forms; the async engine's round-robin over requests."""
from __future__ import annotations

import asyncio
import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from pagedserve import LLM
from pagedserve.errors import ValidationError
from pagedserve.frontend.async_embedding_engine import AsyncEmbeddingEngine
from pagedserve.models.bert import PoolingConfig
from tests.helpers import minilm_path

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog, and then over it again.",
         "PagedAttention", "a", "Embeddings map text to vectors; similar texts land close together."]


@pytest.fixture(scope="module")
def minilm() -> LLM:
    llm = LLM(model=minilm_path(), dtype="float32")
    yield llm
    llm.shutdown()


def _hf_mean_normalized(path: str, texts: list[str]) -> torch.Tensor:
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch.attention_mask[..., None].float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_matches_transformers_with_sentence_transformers_pooling(minilm) -> None:
    outputs = minilm.embed(TEXTS)
    reference = _hf_mean_normalized(minilm_path(), TEXTS)
    mine = torch.tensor([o.outputs.embedding for o in outputs])
    assert mine.shape == (len(TEXTS), 384)
    assert (mine - reference).abs().max().item() < 1e-5
    assert torch.allclose(mine.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6)
    tokenizer = minilm.get_tokenizer()
    assert [o.prompt_token_ids for o in outputs] == [tokenizer(t)["input_ids"] for t in TEXTS]
    # alone or beside longer prompts (padding masked): the same vector
    alone = minilm.embed([TEXTS[3]])[0].outputs.embedding
    assert max(abs(a - b) for a, b in zip(alone, outputs[3].outputs.embedding)) < 1e-6
    # token ids in (alone): the text's vector
    by_ids = minilm.embed([{"prompt_token_ids": outputs[0].prompt_token_ids}])[0].outputs.embedding
    assert by_ids == minilm.embed([TEXTS[0]])[0].outputs.embedding


def test_bert_without_sentence_transformers_files_pools_cls(tmp_path) -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_act="gelu_new")
    BertModel(config).save_pretrained(tmp_path)   # architectures: ["BertModel"]
    llm = LLM(model=str(tmp_path), skip_tokenizer_init=True, dtype="float32")
    try:
        prompts = [[2, 17, 45, 3], [2, 99, 3], [2, 5, 6, 7, 8, 9, 10, 3]]
        mine = torch.tensor([o.outputs.embedding for o in llm.embed([{"prompt_token_ids": p} for p in prompts])])
        assert llm.engine.max_model_len == 64
        with pytest.raises(ValidationError) as info:
            llm.embed([{"prompt_token_ids": [300]}])
        assert info.value.param == "prompt"
    finally:
        llm.shutdown()
    model = BertModel.from_pretrained(tmp_path).eval()
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            cls = model(torch.tensor([prompt])).last_hidden_state[0, 0]
        assert (mine[row] - F.normalize(cls, dim=-1)).abs().max().item() < 1e-5


def test_limits_truncation_and_the_wrong_model_kind(minilm, tiny_checkpoints) -> None:
    engine = minilm.engine
    assert engine.max_model_len == 256   # sentence_bert_config.json's max_seq_length
    long_text = "word " * 400
    with pytest.raises(ValidationError) as info:
        minilm.embed([long_text])
    assert info.value.param == "prompt" and "256" in str(info.value)
    [cut] = minilm.embed([long_text], truncate_prompt_tokens=8)
    assert len(cut.prompt_token_ids) == 8 and cut.prompt_token_ids[0] == 101 and cut.prompt_token_ids[-1] == 102
    with pytest.raises(ValidationError) as info:
        minilm.embed(["x"], truncate_prompt_tokens=257)
    assert info.value.param == "truncate_prompt_tokens"
    with pytest.raises(ValidationError) as info:
        minilm.generate(["Hello"])
    assert info.value.param == "model"
    with pytest.raises(ValidationError) as info:   # knobs an embedding model has no use for are refused
        LLM(model=minilm_path(), tensor_parallel_size=2)
    assert info.value.param == "tensor_parallel_size"
    with pytest.raises(ValidationError) as info:   # vLLM's --runner / --task, checked against the model
        LLM(model=minilm_path(), runner="generate")
    assert info.value.param == "runner"
    with pytest.raises(ValidationError) as info:
        LLM(task="embed")   # the embedded default is a GGUF file (decoders as embedding models: test_embedding_decoder)
    assert info.value.param == "task"
    with pytest.raises(ValidationError) as info:
        LLM(model=minilm_path(), runner="pooling", task="generate")
    assert info.value.param == "task"
    explicit = LLM(model=minilm_path(), runner="pooling", task="embed")
    assert len(explicit.embed("x")[0].outputs.embedding) == 384
    explicit.shutdown()
    generative = LLM(model=tiny_checkpoints["llama"], device="cpu", skip_tokenizer_init=True, num_kv_blocks=16,
                     max_model_len=64)
    try:
        with pytest.raises(ValidationError) as info:
            generative.embed([[1, 2, 3]])
        assert info.value.param == "model"
    finally:
        generative.shutdown()


def test_batches_shortest_first_within_rows_and_padded_tokens(minilm) -> None:
    engine = minilm.engine
    saved = engine.max_num_seqs, engine.max_num_batched_tokens
    try:
        engine.max_num_seqs, engine.max_num_batched_tokens = 3, 20
        # lengths 5 9 2 7 3 4: sorted 2(i2) 3(i4) 4(i5) 5(i0) 7(i3) 9(i1)
        assert engine.batches([5, 9, 2, 7, 3, 4]) == [[2, 4, 5], [0, 3], [1]]   # 4*3=12, 7*2=14, then 9*2 > 20
    finally:
        engine.max_num_seqs, engine.max_num_batched_tokens = saved


class _RecordingRunner:
    pooling = PoolingConfig("mean", True)

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []

    def embed(self, batch: list[list[int]], normalize: list[bool] | None = None, token_types=None) -> list[list[float]]:
        self.batches.append(batch)
        return [[float(ids[0])] for ids in batch]


def test_async_engine_forms_batches_round_robin(minilm) -> None:
    """Three requests queued before the thread runs: a batch takes one input of each in turn,
    so the 5-input request does not go first whole."""
    engine = minilm.engine
    saved = engine.runner, engine.max_num_seqs
    runner = _RecordingRunner()
    engine.runner, engine.max_num_seqs = runner, 4
    async_engine = AsyncEmbeddingEngine.__new__(AsyncEmbeddingEngine)
    try:
        async def main() -> list[list[list[float]]]:
            with_thread = AsyncEmbeddingEngine(engine)
            nonlocal async_engine
            async_engine = with_thread
            with with_thread._cond:   # hold the thread until all three are queued
                tasks = [asyncio.ensure_future(with_thread.embed(ids)) for ids in
                         ([[10], [11], [12], [13], [14]], [[20]], [[30], [31]])]
                await asyncio.sleep(0.05)
            return await asyncio.gather(*tasks)

        results = asyncio.run(main())
    finally:
        async_engine.shutdown()
        engine.runner, engine.max_num_seqs = saved
    assert results == [[[10.0], [11.0], [12.0], [13.0], [14.0]], [[20.0]], [[30.0], [31.0]]]
    assert runner.batches == [[[10], [20], [30], [11]], [[31], [12], [13], [14]]]


def test_async_engine_drops_a_cancelled_requests_inputs_and_fails_after_shutdown(minilm) -> None:
    """A request cancelled while queued (its client left) has its inputs dropped, not run; after
    shutdown a new request gets EngineDeadError and /health's is_healthy is false."""
    from pagedserve.errors import EngineDeadError
    engine = minilm.engine
    saved, runner = engine.runner, _RecordingRunner()
    engine.runner = runner
    async_engine = AsyncEmbeddingEngine(engine)
    try:
        async def main() -> None:
            with async_engine._cond:   # hold the thread: both requests queue
                gone = asyncio.ensure_future(async_engine.embed([[50], [51]]))
                kept = asyncio.ensure_future(async_engine.embed([[60]]))
                await asyncio.sleep(0.05)
                gone.cancel()
                await asyncio.sleep(0.05)
            assert await kept == [[60.0]]
            assert gone.cancelled()

        asyncio.run(main())
        assert runner.batches == [[[60]]]
        assert async_engine.is_healthy
    finally:
        async_engine.shutdown()
        engine.runner = saved
    assert not async_engine.is_healthy
    with pytest.raises(EngineDeadError):
        asyncio.run(async_engine.embed([[1]]))


def test_checkpoint_without_the_pooler_and_with_a_bert_prefix(tmp_path) -> None:
    """A BertForMaskedLM-style file ("bert." names, an MLM head) loads: prefixes dropped, heads ignored."""
    torch.manual_seed(1)
    config = BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    model = BertModel(config, add_pooling_layer=False)
    from safetensors.torch import save_file
    save_file({f"bert.{k}": v.contiguous() for k, v in model.state_dict().items()} | {"cls.bias": torch.zeros(120)},
              str(tmp_path / "model.safetensors"))
    config.architectures = ["BertModel"]
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert os.path.isfile(tmp_path / "model.safetensors")
    llm = LLM(model=str(tmp_path), skip_tokenizer_init=True, dtype="float32")
    try:
        [out] = llm.embed([[2, 7, 9, 3]])
    finally:
        llm.shutdown()
    with torch.no_grad():
        cls = model.eval()(torch.tensor([[2, 7, 9, 3]])).last_hidden_state[0, 0]
    assert (torch.tensor(out.outputs.embedding) - F.normalize(cls, dim=-1)).abs().max().item() < 1e-5


def test_xlm_roberta_model_matches_transformers(tmp_path) -> None:
    """bge-m3's architecture (XLMRobertaModel): positions from the padding id + 1, CLS pooling and
    normalisation without sentence-transformers files; a padded batch equals each prompt alone."""
    from transformers import XLMRobertaConfig, XLMRobertaModel
    torch.manual_seed(6)
    XLMRobertaModel(XLMRobertaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=66, type_vocab_size=1,
                                     pad_token_id=1, initializer_range=0.3,
                                     architectures=["XLMRobertaModel"])).save_pretrained(str(tmp_path))
    prompts = [[0, 5, 9, 100, 2], [0, 7, 2], list(range(3, 60))]
    llm = LLM(model=str(tmp_path), skip_tokenizer_init=True, dtype="float32")
    try:
        got = [torch.tensor(o.outputs.embedding) for o in llm.embed([{"prompt_token_ids": p} for p in prompts])]
    finally:
        llm.shutdown()
    model = AutoModel.from_pretrained(str(tmp_path)).eval()
    for vector, ids in zip(got, prompts):
        with torch.no_grad():
            want = F.normalize(model(torch.tensor([ids])).last_hidden_state[0, 0], dim=-1)
        assert (vector - want).abs().max() < 1e-5
