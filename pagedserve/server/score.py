"""Scoring and classification routes of an embedding model's server (embeddings.py's app), as vLLM
and TEI serve them:

    POST /score, /v1/score     vLLM's: text_1 (a text, or a list) against text_2 -> data[i].score
    POST /rerank, /v1/rerank,  Jina / Cohere's (vLLM's): query and documents -> results sorted by
         /v2/rerank            relevance_score, best first, top_n of them
    POST /rerank with "texts"  text-embeddings-inference's: [{"index", "score", "text"?}], best first;
                               raw_scores gives a cross-encoder's logits; errors in TGI's body
    POST /classify             vLLM's: each input's class probabilities (data[i].probs, label)
    POST /predict              TEI's: [{"score", "label"}] best first (a list of those for a list)

A cross-encoder (BertForSequenceClassification) scores a pair by the sigmoid of its logit; an
embedding model by the cosine similarity of the two texts' vectors (TEI's /rerank needs a
cross-encoder, as TEI's does). Pairs run through the engine's round-robin batches.

Each successful request counts in the server's metrics (embeddings.EmbeddingMetrics: a request,
the tokens run) as an embedding request does. `usage` counts what vLLM's does: each pair's tokens
(an embedding model's pair: both texts' tokens and one pad token between them, vLLM's joined pair),
though a text that occurs in several pairs runs once."""
from __future__ import annotations

import time
from typing import Any, Protocol, Union

from fastapi.responses import JSONResponse, Response
from pydantic import Field

from pagedserve.errors import ValidationError
from pagedserve.frontend.async_embedding_engine import AsyncEmbeddingEngine
from pagedserve.frontend.embedding_engine import class_probs, score_pairs
from pagedserve.frontend.stoppable import until_stopped
from pagedserve.server.context import ServerContext, new_request_id
from pagedserve.server.openai_protocol import _Strict

MAX_SCORE_PAIRS = 2048   # pairs in one request (as MAX_EMBEDDING_INPUTS)


class EmbeddingMetrics(Protocol):
    """What these routes count in (embeddings.EmbeddingMetrics; not imported: it imports us)."""

    def observe(self, started: float, num_tokens: int) -> None: ...


class ScoreRequest(_Strict):
    text_1: Union[str, list[str]]
    text_2: Union[str, list[str]]
    model: str | None = None
    truncate_prompt_tokens: int | None = None
    request_id: str | None = None
    priority: int = Field(default=0)   # vLLM's field; no scheduler here: only 0

    def pairs(self) -> list[tuple[Any, Any]]:
        return _bounded(score_pairs(self.text_1, self.text_2), "text_2")


class RerankRequest(_Strict):
    """Jina's and Cohere's rerank body, as vLLM takes it."""

    query: str
    documents: list[str]
    model: str | None = None
    top_n: int = 0   # 0: every document
    return_documents: bool = True
    truncate_prompt_tokens: int | None = None
    request_id: str | None = None
    priority: int = Field(default=0)

    def pairs(self) -> list[tuple[Any, Any]]:
        if self.top_n < 0:
            raise ValidationError(f"top_n must be >= 0, got {self.top_n}", "top_n")
        return _bounded(score_pairs(self.query, self.documents, ("query", "documents")), "documents")


class TEIRerankRequest(_Strict):
    """text-embeddings-inference's POST /rerank."""

    query: str
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool = False
    truncation_direction: str = "right"

    def pairs(self) -> list[tuple[Any, Any]]:
        if self.truncation_direction.lower() != "right":
            raise ValidationError("truncation_direction left is not supported", "truncation_direction")
        return _bounded(score_pairs(self.query, self.texts, ("query", "texts")), "texts")


def _bounded(pairs: list[tuple[Any, Any]], name: str) -> list[tuple[Any, Any]]:
    if len(pairs) > MAX_SCORE_PAIRS:
        raise ValidationError(f"{name} supports up to {MAX_SCORE_PAIRS} pairs; given {len(pairs)}", name)
    return pairs


def rerank_body(body: Any) -> type[_Strict]:
    """Which /rerank a body is: TEI's holds `texts`, Jina's / Cohere's `documents`."""
    return TEIRerankRequest if isinstance(body, dict) and "texts" in body else RerankRequest


async def score(ctx: ServerContext, metrics: EmbeddingMetrics, pairs: list[tuple[Any, Any]], truncate: int | None,
                names: tuple[str, str], hint: str = "truncate_prompt_tokens"
                ) -> tuple[list[float], list[float] | None, int]:
    """(scores, a cross-encoder's logits or None, usage tokens) of the pairs
    (EmbeddingEngine.score_batch; errors name the side of `names` at fault, `hint` the request's
    truncation option), tokenized in the pool, run through the engine's batches, counted in `metrics`."""
    started = time.monotonic()
    engine: AsyncEmbeddingEngine = ctx.engine   # type: ignore[assignment]
    batch = await engine.process_stoppable(
        lambda stop: engine.engine.score_batch(pairs, truncate, names, hint, stop))
    scores, logits = batch.scores(await engine.embed(batch.id_lists, None, batch.token_types))
    metrics.observe(started, batch.num_tokens)
    return scores, logits, batch.usage_tokens


async def create_score(ctx: ServerContext, request: ScoreRequest, metrics: EmbeddingMetrics) -> Response:
    ctx.check_model(request.model)
    _no_priority(request.priority)
    scores, _, tokens = await score(ctx, metrics, request.pairs(), request.truncate_prompt_tokens,
                                    ("text_1", "text_2"))
    response_id, _ = new_request_id("score", request.request_id)
    return JSONResponse({"id": response_id, "object": "list", "created": int(time.time()), "model": ctx.model_name,
                         "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def create_rerank(ctx: ServerContext, request: RerankRequest, metrics: EmbeddingMetrics) -> Response:
    ctx.check_model(request.model)
    _no_priority(request.priority)
    scores, _, tokens = await score(ctx, metrics, request.pairs(), request.truncate_prompt_tokens,
                                    ("query", "documents"))
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:request.top_n or None]
    results = [{"index": i, "relevance_score": scores[i],
                **({"document": {"text": request.documents[i]}} if request.return_documents else {})} for i in order]
    response_id, _ = new_request_id("rerank", request.request_id)
    return JSONResponse({"id": response_id, "model": ctx.model_name, "usage": {"total_tokens": tokens},
                         "results": results})


async def create_tei_rerank(ctx: ServerContext, request: TEIRerankRequest, metrics: EmbeddingMetrics) -> Response:
    if not ctx.engine.engine.is_classifier or len(ctx.engine.engine.labels) != 1:
        raise ValidationError("model is not a re-ranker model", "model")
    scores, logits, _ = await score(ctx, metrics, request.pairs(), -1 if request.truncate else None,
                                    ("query", "texts"), '"truncate": true')
    values = logits if request.raw_scores else scores
    order = sorted(range(len(values)), key=lambda i: -values[i])
    return JSONResponse([{"index": i, "score": values[i], **({"text": request.texts[i]} if request.return_text else {})}
                         for i in order])


def _no_priority(priority: int) -> None:
    if priority != 0:
        raise ValidationError("priority is not supported for scores (no scheduling policy here)", "priority")


class ClassifyRequest(_Strict):
    """vLLM's /classify body."""

    input: Union[str, list[str]]
    model: str | None = None
    truncate_prompt_tokens: int | None = None
    request_id: str | None = None
    priority: int = Field(default=0)

    def inputs(self) -> list[str]:
        return _texts(self.input, "input")


class PredictRequest(_Strict):
    """text-embeddings-inference's POST /predict (one text, or a list of them)."""

    inputs: Union[str, list[str]]
    raw_scores: bool = False
    truncate: bool = False
    truncation_direction: str = "right"

    def inputs_list(self) -> list[str]:
        if self.truncation_direction.lower() != "right":
            raise ValidationError("truncation_direction left is not supported", "truncation_direction")
        return _texts(self.inputs, "inputs")


def _texts(value: str | list[str], name: str) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise ValidationError(f"{name} must not be empty", name)
    if len(texts) > MAX_SCORE_PAIRS:
        raise ValidationError(f"{name} supports up to {MAX_SCORE_PAIRS} texts; given {len(texts)}", name)
    return texts


async def classify(ctx: ServerContext, metrics: EmbeddingMetrics, texts: list[str], truncate: int | None, param: str,
                   hint: str = "truncate_prompt_tokens") -> tuple[list[list[float]], int]:
    """(each text's logits, tokens), tokenized in the pool, run through the engine's batches,
    counted in `metrics`."""
    started = time.monotonic()
    engine: AsyncEmbeddingEngine = ctx.engine   # type: ignore[assignment]
    model = engine.engine
    if not model.is_classifier:
        raise ValidationError(f"the model {ctx.model_name!r} is not a sequence classifier: /classify needs one", "model")
    id_lists = await engine.process_stoppable(lambda stop: [
        model.process_prompt(t, truncate, param=param, truncate_hint=hint) for t in until_stopped(texts, stop)])
    logits = await engine.embed(id_lists)
    tokens = sum(len(ids) for ids in id_lists)
    metrics.observe(started, tokens)
    return logits, tokens


async def create_classification(ctx: ServerContext, request: ClassifyRequest, metrics: EmbeddingMetrics) -> Response:
    ctx.check_model(request.model)
    _no_priority(request.priority)
    logits, tokens = await classify(ctx, metrics, request.inputs(), request.truncate_prompt_tokens, "input")
    labels = ctx.engine.engine.labels
    data = []
    for i, row in enumerate(logits):
        probs = class_probs(row)
        data.append({"index": i, "label": labels[max(range(len(probs)), key=probs.__getitem__)], "probs": probs,
                     "num_classes": len(probs)})
    response_id, _ = new_request_id("classify", request.request_id)
    return JSONResponse({"id": response_id, "object": "list", "created": int(time.time()), "model": ctx.model_name,
                         "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                                                 "completion_tokens": 0}})


async def create_tei_prediction(ctx: ServerContext, request: PredictRequest, metrics: EmbeddingMetrics) -> Response:
    texts = request.inputs_list()
    logits, _ = await classify(ctx, metrics, texts, -1 if request.truncate else None, "inputs", '"truncate": true')
    labels = ctx.engine.engine.labels
    answers = []
    for row in logits:
        values = row if request.raw_scores else class_probs(row)
        answers.append([{"score": values[i], "label": labels[i]}
                        for i in sorted(range(len(values)), key=lambda i: -values[i])])
    return JSONResponse(answers[0] if isinstance(request.inputs, str) else answers)
