"""Scoring (vLLM's LLM.score, the rerank routes' engine): a cross-encoder (BertForSequenceClassification,
tiny and random, with all-MiniLM's tokenizer) against transformers' sigmoid of its logit for each
(query, document) pair, its token types included; an embedding model's score is the cosine of the
two texts' vectors; vLLM's pairing rules and what is refused."""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification,
                          XLMRobertaConfig, XLMRobertaForSequenceClassification)

from pagedserve import LLM
from pagedserve.errors import ValidationError
from tests.helpers import minilm_path

QUERY = "What is the capital of France?"
DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "France's capital city is Paris, on the Seine."]


def write_cross_encoder(path: str, seed: int = 0, xlm_roberta: bool = False, labels: list[str] | None = None) -> str:
    """A tiny random cross-encoder (BERT's, or XLM-R's: bge-reranker's architecture) with MiniLM's
    tokenizer; with `labels`, a sequence classifier of those classes."""
    torch.manual_seed(seed)
    sizes = dict(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_labels=1, initializer_range=0.3)
    if labels:
        sizes.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                     label2id={label: i for i, label in enumerate(labels)})
    if xlm_roberta:   # positions count from pad_token_id + 1 (so max_position_embeddings is 2 more)
        XLMRobertaForSequenceClassification(XLMRobertaConfig(
            **sizes, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1,
            architectures=["XLMRobertaForSequenceClassification"])).save_pretrained(path)
    else:
        BertForSequenceClassification(BertConfig(**sizes, max_position_embeddings=128, type_vocab_size=2,
                                                 architectures=["BertForSequenceClassification"])).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(os.path.join(minilm_path(), name), path)
    return path


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory) -> str:
    return write_cross_encoder(str(tmp_path_factory.mktemp("cross") / "model"))


def _hf_scores(path: str, pairs: list[tuple[str, str]]) -> list[float]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    one_type = model.config.type_vocab_size == 1   # XLM-R's tokenizer gives no second segment
    with torch.no_grad():
        return [float(torch.sigmoid(model(**tokenizer(a, b, return_tensors="pt", return_token_type_ids=not one_type)
                                          ).logits[0, 0])) for a, b in pairs]


def test_cross_encoder_matches_transformers(cross_encoder) -> None:
    llm = LLM(model=cross_encoder, dtype="float32")
    try:
        got = [o.outputs.score for o in llm.score(QUERY, DOCS)]
        pairwise = [o.outputs.score for o in llm.score([QUERY, DOCS[1]], [DOCS[0], DOCS[2]])]
        cut = llm.score(QUERY, DOCS[2] * 20, truncate_prompt_tokens=32)
        with pytest.raises(ValidationError) as error:
            llm.embed("x")
        assert error.value.param == "model" and "LLM.score" in str(error.value)
    finally:
        llm.shutdown()
    want = _hf_scores(cross_encoder, [(QUERY, d) for d in DOCS])
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5 and len(set(round(g, 4) for g in got)) == 3
    assert max(abs(a - b) for a, b in zip(pairwise, _hf_scores(cross_encoder, [(QUERY, DOCS[0]),
                                                                                (DOCS[1], DOCS[2])]))) < 1e-5
    assert 0 < cut[0].outputs.score < 1


def test_token_types_matter(cross_encoder) -> None:
    """The second text's segment embedding is applied: swapping the texts changes the score."""
    llm = LLM(model=cross_encoder, dtype="float32")
    try:
        ab, ba = (o.outputs.score for o in llm.score([QUERY, DOCS[0]], [DOCS[0], QUERY]))
    finally:
        llm.shutdown()
    assert abs(ab - ba) > 1e-4
    assert max(abs(a - b) for a, b in zip((ab, ba), _hf_scores(cross_encoder, [(QUERY, DOCS[0]),
                                                                              (DOCS[0], QUERY)]))) < 1e-5


def test_embedding_model_scores_cosine() -> None:
    llm = LLM(model=minilm_path(), dtype="float32")
    try:
        scores = [o.outputs.score for o in llm.score(QUERY, DOCS)]
        vectors = [o.outputs.embedding for o in llm.embed([QUERY, *DOCS])]
        with pytest.raises(ValidationError) as error:
            llm.score([QUERY, QUERY], DOCS)
        assert error.value.param == "text_2"
        with pytest.raises(ValidationError) as error:
            llm.score([], DOCS)
        assert error.value.param == "text_1"
    finally:
        llm.shutdown()
    for score, vector in zip(scores, vectors[1:]):
        dot = sum(x * y for x, y in zip(vectors[0], vector))
        assert abs(score - dot / math.sqrt(sum(x * x for x in vector) * sum(x * x for x in vectors[0]))) < 1e-6
    assert scores[0] > scores[1] and scores[2] > scores[1]   # the model knows Paris is not a banana


def test_a_generative_model_cannot_score() -> None:
    llm = LLM(num_kv_blocks=64, max_model_len=256, device="cpu")
    try:
        with pytest.raises(ValidationError) as error:
            llm.score(QUERY, DOCS)
        assert error.value.param == "model"
    finally:
        llm.shutdown()


def test_xlm_roberta_cross_encoder_matches_transformers(tmp_path) -> None:
    """bge-reranker's architecture: XLM-R positions (from the padding id + 1), its classifier head
    (dense, tanh, out_proj) on the first token, one token type."""
    path = write_cross_encoder(str(tmp_path / "xlmr"), seed=4, xlm_roberta=True)
    llm = LLM(model=path, dtype="float32")
    try:
        got = [o.outputs.score for o in llm.score(QUERY, DOCS)]   # one batch: the shorter pairs padded
    finally:
        llm.shutdown()
    want = _hf_scores(path, [(QUERY, d) for d in DOCS])
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5 and len(set(round(g, 4) for g in got)) == 3


def test_classifier_probs_match_transformers(tmp_path) -> None:
    """vLLM's LLM.classify: a three-label classifier's softmax, as transformers'; its label names;
    scores (one relevance logit) are refused for it, naming model."""
    labels = ["negative", "neutral", "positive"]
    path = write_cross_encoder(str(tmp_path / "cls"), seed=5, labels=labels)
    llm = LLM(model=path, dtype="float32")
    try:
        got = llm.classify(DOCS)
        assert llm.engine.labels == labels
        with pytest.raises(ValidationError) as error:
            llm.score(QUERY, DOCS)
        assert error.value.param == "model" and "classify" in str(error.value)
    finally:
        llm.shutdown()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    for output, text in zip(got, DOCS):
        with torch.no_grad():
            want = torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits[0], -1)
        assert output.outputs.num_classes == 3 and (torch.tensor(output.outputs.probs) - want).abs().max() < 1e-5
