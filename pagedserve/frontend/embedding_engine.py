"""Embedding models (vLLM's pooling runner): prompts -> token ids -> batches -> one vector each.

A folder whose config.json names a pooling architecture (models/bert.py) is served by this
engine instead of LLMEngine: no KV cache, no scheduler, no sampling. `EmbeddingEngine` checks
and tokenizes prompts and runs them in batches of at most max_num_seqs rows and
max_num_batched_tokens padded tokens (sorted by length, so a batch pads little); the server's
AsyncEmbeddingEngine (async_embedding_engine.py) batches round-robin over the requests."""
from __future__ import annotations

import json
import logging
import math
import os
import threading
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

from pagedserve.config import resolve_dtype
from pagedserve.engine_args import EngineArgs
from pagedserve.errors import ModelLoadError, ValidationError
from pagedserve.frontend.prompt_bound import prompt_length_bound
from pagedserve.frontend.stoppable import until_stopped
from pagedserve.config import ModelConfig
from pagedserve.models.bert import POOLING_ARCHITECTURES, PoolingConfig, read_pooling_config
from pagedserve.models.loader import load_hf_config, load_tokenizer, resolve_model
from pagedserve.models.registry import BACKBONE_ARCHITECTURES, MODEL_REGISTRY
from pagedserve.worker.kv_budget import resolve_device
from pagedserve.worker.pooling_runner import DecoderPoolingRunner, PoolingRunner

logger = logging.getLogger(__name__)

DEFAULT_BATCHED_TOKENS = {"cpu": 4096, "cuda": 32768}   # padded tokens in one batch
# engine knobs with a meaning for an embedding model only at these values (else a ValidationError)
_EMBEDDING_KNOBS = (("tensor_parallel_size", (1,)), ("pipeline_parallel_size", (1,)), ("quantization", (None,)),
                    ("scheduling_policy", ("continuous", "fcfs")), ("load_format", ("auto", "safetensors", "pt")))


def _architectures(model: str | None) -> list[str] | None:
    """The architectures a model folder's config.json names; None for the embedded default, a
    GGUF file and a model that cannot be found or read (the generative engine's loading then
    says why, as it always has)."""
    if model is None:
        return None   # the embedded default is a generative GGUF
    try:
        source = resolve_model(model)
        if source.gguf_file:
            return None
        return list(_read_config(source.directory).get("architectures") or ())
    except ModelLoadError:
        return None


def use_pooling(args: EngineArgs) -> bool:
    """Whether `args` make an embedding engine (vLLM's pooling runner). An encoder (BertModel)
    or a decoder's backbone alone (MistralModel, Qwen3Model, ...: no LM head) is one by itself;
    a generative decoder (Qwen3ForCausalLM: Qwen3-Embedding's checkpoints) when runner "pooling"
    or task "embed" asks, as in vLLM. A runner / task that the model cannot serve is refused."""
    archs = set(_architectures(args.model) or ())
    embedding_only = bool(archs & (set(POOLING_ARCHITECTURES) | set(BACKBONE_ARCHITECTURES)))
    asked = "runner" if args.runner != "auto" else "task"
    if args.runner == "pooling" or args.task in ("embed", "embedding"):
        if not embedding_only and not archs & set(MODEL_REGISTRY):
            raise ValidationError("an embedding runner needs a model folder with an encoder (BERT, RoBERTa, XLM-R) or "
                                  f"a decoder of {', '.join(sorted(MODEL_REGISTRY))} (a GGUF file is not one)", asked)
        return True
    if (args.runner == "generate" or args.task == "generate") and embedding_only:
        raise ValidationError(f"this model ({', '.join(sorted(archs))}) has no language-model head: it is an "
                              "embedding model and cannot generate text", asked)
    return embedding_only


def _read_config(directory: str) -> dict[str, Any]:
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the model config in {directory}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{directory}/config.json is not a JSON object")
    return data


@dataclass
class ScoreBatch:
    """Scoring's runner inputs and how its outputs become scores: a cross-encoder's relevance (the
    sigmoid of its logit, as sentence-transformers' CrossEncoder), or an embedding model's cosine
    similarity of the two texts' vectors (`texts`: the distinct texts the id lists are of, each run
    once). `usage_tokens`: what vLLM's score usage counts, each pair's tokens (an embedding model's
    pair: both texts' and, if the tokenizer has a pad token, one more: vLLM joins the two with it)."""

    pairs: list[tuple[Any, Any]]
    id_lists: list[list[int]]
    token_types: list[list[int]] | None
    texts: list[str] | None
    usage_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        """The tokens the runner takes (what the server's prompt_tokens metric counts)."""
        return sum(len(ids) for ids in self.id_lists)

    def scores(self, vectors: list[list[float]]) -> tuple[list[float], list[float] | None]:
        """(scores, a cross-encoder's logits or None) from the runner's vectors of id_lists."""
        if self.texts is None:
            logits = [row[0] for row in vectors]
            return [relevance(x) for x in logits], logits
        by_text = dict(zip(self.texts, vectors))
        return [cosine(by_text[a], by_text[b]) for a, b in self.pairs], None


class EmbeddingEngine:
    """Synchronous: process_prompt (any thread) and embed_ids (one thread at a time)."""

    def __init__(self, args: EngineArgs) -> None:
        args.validate()
        for name, allowed in _EMBEDDING_KNOBS:
            if getattr(args, name) not in allowed:
                raise ValidationError(f"{name}={getattr(args, name)!r} does not apply to an embedding model "
                                      f"(one device, its checkpoint's weights)", name)
        self.device = resolve_device(args.device)
        source = resolve_model(args.model)
        config = _read_config(source.directory)
        encoder = bool(set(config.get("architectures") or ()) & set(POOLING_ARCHITECTURES))
        # vLLM's defaults without sentence-transformers files: an encoder's CLS, a decoder's last token
        pooling, seq_limit = read_pooling_config(source.directory, PoolingConfig("cls" if encoder else "last"))
        positions = int(config.get("max_position_embeddings", 512))
        if args.max_model_len is not None and args.max_model_len > positions:
            raise ValidationError(f"max_model_len {args.max_model_len} exceeds the model's max_position_embeddings "
                                  f"{positions}", "max_model_len")
        window = None if encoder or config.get("use_sliding_window") is False else config.get("sliding_window")
        self.max_model_len = args.max_model_len or min(positions, seq_limit or positions, window or positions)
        self.max_num_seqs = args.max_num_seqs or 256
        self.max_num_batched_tokens = max(args.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS[self.device.type],
                                          self.max_model_len)
        self.vocab_size = int(config["vocab_size"])
        dtype = resolve_dtype(args.dtype, config.get("torch_dtype") or config.get("dtype"), self.device.type)
        self.tokenizer = None if args.skip_tokenizer_init else load_tokenizer(source, args.tokenizer)
        # A fast tokenizer's truncation is state it sets for each call (and resets for the next call
        # without it): requests tokenized on several threads take turns, or a request's cut was lost
        # to another's reset (a 400 "a prompt has 302 tokens" under load).
        self._tokenizer_lock = threading.Lock()
        if encoder:
            # config.json as attributes; num_labels as transformers derives it (a cross-encoder's head)
            hf_config = SimpleNamespace(**{"num_labels": len(config.get("id2label") or {"0": 0}), **config})
            self.runner = PoolingRunner(source.directory, hf_config, pooling, dtype, self.device)
        else:
            if config.get("quantization_config"):
                raise ValidationError("a quantized checkpoint as an embedding model is not supported", "model")
            hf_config = load_hf_config(source)
            # a backbone alone (Qwen3Model) is served by its generative class (Qwen3ForCausalLM)
            hf_config.architectures = [BACKBONE_ARCHITECTURES.get(a, a) for a in config.get("architectures") or ()]
            model_config = ModelConfig.from_hf(hf_config, dtype, self.max_model_len)
            self.runner = DecoderPoolingRunner(source.directory, replace(model_config, tie_word_embeddings=True),
                                               pooling, self.max_num_batched_tokens, self.max_num_seqs, self.device,
                                               args.seed)
        self.dimensions = self.runner.dimensions
        # Matryoshka (vLLM reads the same config fields): any shorter size, or the ones listed
        listed = config.get("matryoshka_dimensions")
        self.matryoshka: tuple[int, ...] | bool = tuple(listed) if isinstance(listed, list) and listed \
            else bool(config.get("is_matryoshka"))
        self.is_classifier = self.runner.is_classifier   # a sequence classifier: /classify; one label: a cross-encoder
        self.labels: list[str] = getattr(self.runner, "labels", [])

    def process_prompt(self, prompt: Any, truncate_prompt_tokens: int | None = None, add_special_tokens: bool = True,
                       param: str = "prompt", truncate_hint: str = "truncate_prompt_tokens") -> list[int]:
        """A string, a token id list, or vLLM's {"prompt"} / {"prompt_token_ids"} -> checked
        token ids. truncate_prompt_tokens k (-1: max_model_len): a text is cut by the tokenizer
        to k tokens (its special tokens kept), a token id list to its last k."""
        keep = self._keep(truncate_prompt_tokens)
        if isinstance(prompt, dict):
            prompt = prompt["prompt_token_ids"] if "prompt_token_ids" in prompt else prompt.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValidationError("text prompts need a tokenizer (skip_tokenizer_init is set)", param)
            if keep is None:
                self._refuse_if_too_long(prompt, param, truncate_hint)
            else:   # only the prefix its first `keep` tokens surely come from (a 15 MB text need not be read)
                prompt = prompt_length_bound(self.tokenizer).head_text(prompt, keep, self._tokenizer_lock)
            kwargs = {"truncation": True, "max_length": keep} if keep is not None else {}
            with self._tokenizer_lock:
                ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)[-keep:] if keep is not None else list(prompt)
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValidationError(f"token id {bad} is out of vocabulary (size {self.vocab_size})", param)
        else:
            raise ValidationError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}",
                                  param)
        if not ids:
            raise ValidationError("a prompt must hold at least one token", param)
        if len(ids) > self.max_model_len:
            raise ValidationError(f"this model's maximum context length is {self.max_model_len} tokens; a prompt has "
                                  f"{len(ids)} ({truncate_hint} cuts it)", param)
        return ids

    def check_dimensions(self, dimensions: int | None) -> None:
        """`dimensions` the model can give: its own, or a Matryoshka model's shorter ones."""
        if dimensions is None or dimensions == self.dimensions:
            return
        if not self.matryoshka:
            raise ValidationError(f"dimensions: this model's embeddings have {self.dimensions} and cannot be "
                                  f"shortened (not a Matryoshka model); got {dimensions}", "dimensions")
        allowed = self.matryoshka if isinstance(self.matryoshka, tuple) else None
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= self.dimensions \
                or (allowed is not None and dimensions not in allowed):
            sizes = f"one of {list(allowed)}" if allowed else f"1..{self.dimensions}"
            raise ValidationError(f"dimensions must be {sizes} for this Matryoshka model, got {dimensions}",
                                  "dimensions")

    def process_pair(self, text_1: Any, text_2: Any, truncate_prompt_tokens: int | None = None,
                     names: tuple[str, str] = ("text_1", "text_2"), truncate_hint: str = "truncate_prompt_tokens"
                     ) -> tuple[list[int], list[int]]:
        """A cross-encoder's (query, document) pair -> (token ids, token types), as its tokenizer
        joins them; cut to truncate_prompt_tokens (-1: max_model_len) longest text first. Errors
        name the request field of the text at fault (`names`: the two sides' fields): a pair
        too long names the side whose text is the longer."""
        for text, name in ((text_1, names[0]), (text_2, names[1])):
            if not isinstance(text, str):
                raise ValidationError("a cross-encoder scores pairs of texts (strings)", name)
        if self.tokenizer is None:
            raise ValidationError("text pairs need a tokenizer (skip_tokenizer_init is set)", names[0])
        keep = self._keep(truncate_prompt_tokens)
        if keep is None:   # a pair has at least the tokens of each of its texts
            self._refuse_if_too_long(text_1, names[0], truncate_hint)
            self._refuse_if_too_long(text_2, names[1], truncate_hint)
        kwargs = {"truncation": True, "max_length": keep} if keep is not None else {}
        with self._tokenizer_lock:
            encoded = self.tokenizer(text_1, text_2, return_token_type_ids=True, **kwargs)
        ids = encoded["input_ids"]
        if len(ids) > self.max_model_len:
            with self._tokenizer_lock:
                first, second = (len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (text_1, text_2))
            raise ValidationError(f"this model's maximum context length is {self.max_model_len} tokens; a pair of "
                                  f"{names[0]} ({first} tokens) and {names[1]} ({second}) has {len(ids)} "
                                  f"({truncate_hint} cuts it)", names[0] if first > second else names[1])
        return ids, encoded["token_type_ids"]

    def _refuse_if_too_long(self, text: str, param: str, truncate_hint: str) -> None:
        """A text that surely makes more than max_model_len tokens is refused before it is
        tokenized whole (prompt_bound: a 15 MB input held a tokenizing thread ~12 s to reach the
        same 400); one that may fit is left to the tokenizer."""
        found = prompt_length_bound(self.tokenizer).at_least(text, self.max_model_len + 1, self._tokenizer_lock)
        if found is not None:
            raise ValidationError(f"this model's maximum context length is {self.max_model_len} tokens; a prompt has "
                                  f"at least {found.tokens} ({found.reason}; {truncate_hint} cuts it)", param)

    def _keep(self, truncate_prompt_tokens: int | None) -> int | None:
        """truncate_prompt_tokens checked: the tokens to keep, or None."""
        if truncate_prompt_tokens is None:
            return None
        if isinstance(truncate_prompt_tokens, bool) or not isinstance(truncate_prompt_tokens, int) or \
                not (truncate_prompt_tokens == -1 or 1 <= truncate_prompt_tokens <= self.max_model_len):
            raise ValidationError(f"truncate_prompt_tokens must be -1 or 1..{self.max_model_len}, got "
                                  f"{truncate_prompt_tokens!r}", "truncate_prompt_tokens")
        return self.max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens

    def batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices into `lengths`, shortest first, in batches of at most max_num_seqs rows and
        max_num_batched_tokens padded tokens."""
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        batches: list[list[int]] = []
        for index in order:
            current = batches[-1] if batches else None
            if current is None or len(current) >= self.max_num_seqs or \
                    lengths[index] * (len(current) + 1) > self.max_num_batched_tokens:
                batches.append([index])
            else:
                current.append(index)
        return batches

    def embed_ids(self, id_lists: list[list[int]], token_types: list[list[int]] | None = None) -> list[list[float]]:
        """The runner's vector of each id list (a cross-encoder's: [logit], of each pair)."""
        vectors: list[list[float] | None] = [None] * len(id_lists)
        for batch in self.batches([len(ids) for ids in id_lists]):
            types = None if token_types is None else [token_types[i] for i in batch]
            for index, vector in zip(batch, self.runner.embed([id_lists[i] for i in batch], None, types)):
                vectors[index] = vector
        return vectors   # type: ignore[return-value]

    def check_cross_encoder(self) -> None:
        """Scores need one relevance logit (a classifier of more labels classifies: /classify)."""
        if self.is_classifier and len(self.labels) != 1:
            raise ValidationError(f"this model classifies into {len(self.labels)} labels: scores need a cross-encoder "
                                  "(one label); use classify", "model")

    def score_batch(self, pairs: list[tuple[Any, Any]], truncate_prompt_tokens: int | None = None,
                    names: tuple[str, str] = ("text_1", "text_2"), truncate_hint: str = "truncate_prompt_tokens",
                    stop: threading.Event | None = None) -> ScoreBatch:
        """The runner's inputs for scoring (text_1, text_2) pairs (any thread: tokenizing only): a
        cross-encoder's pairs with their token types, an embedding model's distinct texts. Errors
        name the field (`names`: the request's two sides) of the text at fault; `stop` set (the
        request was cancelled), tokenizing ends before the next text (Stopped)."""
        self.check_cross_encoder()
        if self.is_classifier:
            encoded = [self.process_pair(a, b, truncate_prompt_tokens, names, truncate_hint)
                       for a, b in until_stopped(pairs, stop)]
            id_lists = [ids for ids, _ in encoded]
            return ScoreBatch(pairs, id_lists, [types for _, types in encoded], None,
                              sum(len(ids) for ids in id_lists))
        for side, name in enumerate(names):
            if any(not isinstance(pair[side], str) for pair in pairs):
                raise ValidationError("scores are of texts (strings)", name)
        firsts = {a for a, _ in pairs}
        texts = list(dict.fromkeys(text for pair in pairs for text in pair))
        id_lists = [self.process_prompt(text, truncate_prompt_tokens, param=names[0] if text in firsts else names[1],
                                        truncate_hint=truncate_hint) for text in until_stopped(texts, stop)]
        lengths = {text: len(ids) for text, ids in zip(texts, id_lists)}
        pad = 0 if getattr(self.tokenizer, "pad_token_id", None) is None else 1
        return ScoreBatch(pairs, id_lists, None, texts, sum(lengths[a] + pad + lengths[b] for a, b in pairs))

    def score(self, pairs: list[tuple[Any, Any]], truncate_prompt_tokens: int | None = None
              ) -> tuple[list[float], int]:
        """vLLM's scores of the pairs and the tokens they took (ScoreBatch.scores)."""
        batch = self.score_batch(pairs, truncate_prompt_tokens)
        scores, _ = batch.scores(self.embed_ids(batch.id_lists, batch.token_types))
        return scores, batch.num_tokens

    def shutdown(self) -> None:
        pass


def relevance(logit: float) -> float:
    """A cross-encoder's one logit as a score in (0, 1)."""
    return 1.0 / (1.0 + math.exp(-logit)) if logit >= 0 else math.exp(logit) / (1.0 + math.exp(logit))


def cosine(a: list[float], b: list[float]) -> float:
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return sum(x * y for x, y in zip(a, b)) / norm if norm else 0.0


def score_pairs(text_1: Any, text_2: Any, names: tuple[str, str] = ("text_1", "text_2")) -> list[tuple[Any, Any]]:
    """vLLM's pairing: one text_1 against every text_2, or pairwise when both are lists of one
    length (a single text_2 pairs with a one-entry text_1)."""
    first = [text_1] if isinstance(text_1, str) else list(text_1) if isinstance(text_1, (list, tuple)) else None
    second = [text_2] if isinstance(text_2, str) else list(text_2) if isinstance(text_2, (list, tuple)) else None
    if not first or first is None:
        raise ValidationError(f"{names[0]} must be a text or a non-empty list of texts", names[0])
    if not second or second is None:
        raise ValidationError(f"{names[1]} must be a text or a non-empty list of texts", names[1])
    if len(first) == 1:
        return [(first[0], text) for text in second]
    if len(first) != len(second):
        raise ValidationError(f"{names[0]} has {len(first)} texts and {names[1]} {len(second)}: give one "
                              f"{names[0]}, or as many as {names[1]}", names[1])
    return list(zip(first, second))


def class_probs(logits: list[float]) -> list[float]:
    """A classifier's probabilities, as vLLM's classify gives them: the softmax of its logits, or
    the sigmoid of a single one."""
    if len(logits) == 1:
        return [relevance(logits[0])]
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def shorten(vector: list[float], dimensions: int, normalize: bool) -> list[float]:
    """A Matryoshka vector's first `dimensions` entries, L2-normalised again when it was."""
    head = vector[:dimensions]
    if not normalize:
        return head
    norm = math.sqrt(sum(x * x for x in head))
    return [x / norm for x in head] if norm else head
