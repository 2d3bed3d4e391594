"""The offline API, shaped like vLLM's: LLM(...).generate(prompts, SamplingParams(...))."""
from __future__ import annotations

import gc
import logging
import weakref
from typing import Any, Sequence

from tqdm.auto import tqdm

from pagedserve.engine_args import EngineArgs
from pagedserve.errors import ValidationError
from pagedserve.frontend.beam_search import BeamSearch, BeamSearchOutput, step_logprobs
from pagedserve.frontend.embedding_engine import EmbeddingEngine, class_probs, score_pairs, use_pooling
from pagedserve.lora_request import LoRARequest
from pagedserve.frontend.gc_policy import hot_loop_collector
from pagedserve.frontend.input_processor import PromptType
from pagedserve.frontend.llm_engine import LLMEngine
from pagedserve.logger import configure_default_logging
from pagedserve.outputs import (ClassificationOutput, ClassificationRequestOutput, EmbeddingOutput,
                                EmbeddingRequestOutput, RequestOutput, ScoringOutput, ScoringRequestOutput)
from pagedserve.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)


class LLM:
    """An offline engine. `model=None` loads the embedded default (SmolLM2-135M-Instruct)."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        """`kwargs`: any EngineArgs field (engine_args.py lists them with their help), e.g.
        dtype="float32", max_model_len=1024, tensor_parallel_size=2; an unknown or
        unsupported one is a ValidationError naming it. Sets up the `pagedserve` log
        output unless the application configured it (logger.py)."""
        configure_default_logging()
        args = EngineArgs.from_kwargs(model=model, **kwargs)
        # an embedding model (frontend/embedding_engine.py) gets the pooling engine: embed() only
        self.engine: LLMEngine | EmbeddingEngine = (EmbeddingEngine(args) if use_pooling(args)
                                                    else LLMEngine(args, offline=True))
        self._request_counter = 0
        # Start-up left ~10^5 long-lived objects no full collection has walked (pagedserve's import
        # runs with the collector off), so the first one fell inside the first generate: ~120 ms
        # of GIL, one stalled step (H200, llama-1b thr512: 4% of the run; benchmarks/RESULTS.md,
        # session 18). Collected here and frozen, as the server's engine-core process does, so no
        # later full collection walks them; unless the application froze objects itself, the
        # shutdown below unfreezes (the engine's cycles are collectable again).
        gc.collect()
        owns_freeze = gc.get_freeze_count() == 0
        if owns_freeze:
            gc.freeze()
        # shutdown() runs once: when called, when this LLM is garbage-collected, or at
        # interpreter exit, whichever comes first (no rank process outlives its LLM)
        self._shutdown = weakref.finalize(self, _release, self.engine, owns_freeze)

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in input order. `lora_request`: the LoRA
        adapter, for every prompt or one per prompt (None: the base model), with enable_lora.
        `priority`: one per prompt (lower runs first), with scheduling_policy="priority" (vLLM's
        LLM.generate arguments)."""
        self._generative()
        prompts = _as_prompt_list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        if priority is not None and (isinstance(priority, (str, bytes)) or len(priority) != len(prompts)):
            raise ValidationError(f"priority must be a list of one integer per prompt ({len(prompts)})", "priority")
        return self._run(prompts, params, use_tqdm, priorities=priority, loras=_per_prompt_lora(lora_request, len(prompts)))

    def embed(self, prompts: PromptType | Sequence[PromptType], truncate_prompt_tokens: int | None = None,
              use_tqdm: bool = False) -> list[EmbeddingRequestOutput]:
        """vLLM's LLM.embed, for an embedding model (a BertModel folder, a decoder's backbone, or a
        decoder under runner="pooling"): one vector per prompt, pooled and normalised as its
        sentence-transformers modules say."""
        if not isinstance(self.engine, EmbeddingEngine) or self.engine.is_classifier:
            raise ValidationError("LLM.embed needs an embedding model (a sentence-transformers BertModel folder, or a "
                                  "decoder with runner=\"pooling\"); this one "
                                  + ("is a sequence classifier: use LLM.classify (LLM.score with one label)"
                                     if isinstance(self.engine, EmbeddingEngine)
                                     else "generates text"), "model")
        prompts = _as_prompt_list(prompts)
        ids = [self.engine.process_prompt(p, truncate_prompt_tokens) for p in prompts]
        vectors = self.engine.embed_ids(ids)
        first = self._request_counter
        self._request_counter += len(prompts)
        return [EmbeddingRequestOutput(str(first + i), EmbeddingOutput(vector), prompt_ids)
                for i, (prompt_ids, vector) in enumerate(zip(ids, vectors))]

    def score(self, data_1: str | Sequence[str], data_2: str | Sequence[str],
              truncate_prompt_tokens: int | None = None, use_tqdm: bool = False) -> list[ScoringRequestOutput]:
        """vLLM's LLM.score: one text against each of data_2, or pairwise (two lists of one length).
        A cross-encoder (BertForSequenceClassification) scores each pair's relevance (the sigmoid
        of its logit); an embedding model the cosine similarity of the two texts' vectors."""
        if not isinstance(self.engine, EmbeddingEngine):
            raise ValidationError("LLM.score needs a cross-encoder or an embedding model; this one generates text",
                                  "model")
        pairs = score_pairs(data_1, data_2)
        scores, _ = self.engine.score(pairs, truncate_prompt_tokens)
        first = self._request_counter
        self._request_counter += len(pairs)
        return [ScoringRequestOutput(str(first + i), ScoringOutput(score)) for i, score in enumerate(scores)]

    def classify(self, prompts: PromptType | Sequence[PromptType], truncate_prompt_tokens: int | None = None,
                 use_tqdm: bool = False) -> list[ClassificationRequestOutput]:
        """vLLM's LLM.classify, for a sequence classifier (Bert / RoBERTa / XLM-R
        ForSequenceClassification): each prompt's class probabilities (softmax; one label: sigmoid)."""
        if not isinstance(self.engine, EmbeddingEngine) or not self.engine.is_classifier:
            raise ValidationError("LLM.classify needs a sequence classifier (a *ForSequenceClassification folder)",
                                  "model")
        prompts = _as_prompt_list(prompts)
        ids = [self.engine.process_prompt(p, truncate_prompt_tokens) for p in prompts]
        logits = self.engine.embed_ids(ids)
        first = self._request_counter
        self._request_counter += len(prompts)
        return [ClassificationRequestOutput(str(first + i), ClassificationOutput(class_probs(row)), prompt_ids)
                for i, (prompt_ids, row) in enumerate(zip(ids, logits))]

    def _generative(self) -> LLMEngine:
        if isinstance(self.engine, EmbeddingEngine):
            raise ValidationError("this model is an embedding model: use LLM.embed()", "model")
        return self.engine

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False, lora_request: LoRARequest | None = None) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search (frontend/beam_search.py): for each prompt the `beam_width` best
        sequences, best first; each step runs every prompt's beams as one batch of one-token
        requests (the prefix cache keeps what beams share), with `lora_request`'s adapter if given.
        A sequence's `tokens` and `text` include the prompt, as vLLM's do."""
        prompts = _as_prompt_list(prompts)
        processor = self._generative().input_processor
        searches: list[tuple[BeamSearch, str | None]] = []
        for prompt in prompts:
            processed = processor.process_prompt(prompt)
            processor.check_beam_search(len(processed.prompt_token_ids), params.beam_width, params.max_tokens)
            searches.append((BeamSearch(processed.prompt_token_ids, params, self.engine.eos_token_ids),
                             processed.cache_salt))
        with tqdm(total=params.max_tokens, desc="Beam search", disable=not use_tqdm) as bar:
            while live := [(search, salt) for search, salt in searches if not search.done]:
                step = [({"prompt_token_ids": beam.tokens, "cache_salt": salt} if salt else
                         {"prompt_token_ids": beam.tokens}, search.step_params)
                        for search, salt in live for beam in search.beams]
                outputs = iter(self._run([p for p, _ in step], [sp for _, sp in step], use_tqdm=False,
                                         loras=_per_prompt_lora(lora_request, len(step))))
                for search, _ in live:
                    search.advance([step_logprobs(next(outputs)) for _ in search.beams])
                bar.update(1)
        tokenizer = self.engine.tokenizer
        results = []
        for search, _ in searches:
            best = search.best()
            for beam in best:
                beam.text = tokenizer.decode(beam.tokens) if tokenizer is not None else None
            results.append(BeamSearchOutput(best))
        return results

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | Sequence[SamplingParams]
             | None = None, use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
             documents: list[dict] | None = None, lora_request: LoRARequest | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of conversations, rendered
        with the model's chat template (or `chat_template`); `tools`, `documents` and
        `chat_template_kwargs` are passed to the template as vLLM's LLM.chat does; `lora_request`
        as in generate."""
        if not messages:
            raise ValidationError("messages must not be empty", "messages")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        processor = self._generative().input_processor
        prompts = [processor.render_chat(conv, chat_template, add_generation_prompt, continue_final_message, tools,
                                         documents, chat_template_kwargs)
                   for conv in conversations]
        params = _per_prompt(sampling_params, len(prompts))
        return self._run(prompts, params, use_tqdm, add_special_tokens=False,
                         loras=_per_prompt_lora(lora_request, len(prompts)))

    def _run(self, prompts: list[PromptType], params: list[SamplingParams], use_tqdm: bool,
             add_special_tokens: bool = True, priorities: Sequence[int] | None = None,
             loras: list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        # no gen-0 collection every step (frontend/gc_policy.py), nor while the requests are added: at
        # CPython's 700 a thr512 batch's 512 took ~7 gen-0 collections and a gen-1 (~7 ms, H200 host)
        with hot_loop_collector():
            ids = []
            try:
                for i, (prompt, sp) in enumerate(zip(prompts, params)):
                    request_id = str(self._request_counter)
                    self._request_counter += 1
                    self.engine.add_request(request_id, prompt, sp, add_special_tokens=add_special_tokens,
                                            priority=priorities[i] if priorities is not None else 0,
                                            lora_request=loras[i] if loras is not None else None)
                    ids.append(request_id)
            except Exception:
                for request_id in ids:
                    self.engine.abort_request(request_id)
                raise
            results: dict[str, RequestOutput] = {}
            bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
            try:
                wanted = set(ids)   # the engine may hold other requests (added to llm.engine directly)
                while len(results) < len(ids):
                    for output in self.engine.step():
                        if output.finished and output.request_id in wanted:
                            results[output.request_id] = output
                            bar.update(1)
            finally:
                bar.close()
                for request_id in ids:
                    if request_id not in results:
                        self.engine.abort_request(request_id)
            return [results[request_id] for request_id in ids]

    def shutdown(self) -> None:
        """Release the engine (and stop its tensor-parallel ranks). Idempotent."""
        self._shutdown()


def _release(engine: LLMEngine, owns_freeze: bool) -> None:
    try:
        engine.shutdown()
    finally:
        if owns_freeze:
            gc.unfreeze()


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValidationError(f"prompts must be a string, a dict, a token id list or a list of those, "
                              f"got {type(prompts).__name__}", "prompt")
    prompts = list(prompts)
    if not prompts:
        raise ValidationError("prompts must not be empty", "prompts")
    return prompts


def _per_prompt_lora(lora: LoRARequest | Sequence[LoRARequest | None] | None, count: int
                     ) -> list[LoRARequest | None] | None:
    if lora is None or isinstance(lora, LoRARequest):
        return None if lora is None else [lora] * count
    if isinstance(lora, (str, bytes)) or not isinstance(lora, Sequence) or len(lora) != count:
        raise ValidationError(f"lora_request must be a LoRARequest or a list of one per prompt ({count})",
                              "lora_request")
    return list(lora)


def _per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValidationError(f"got {len(params)} sampling_params for {count} prompts", "sampling_params")
    return params
