"""BERT encoders for embeddings (vLLM's pooling runner): BertModel with transformers' parameter
names (so a checkpoint's state dict loads as it is), run on a padded batch with a key padding
mask and no KV cache, then pooled as the folder's sentence-transformers modules say (mean,
CLS, last or max token; L2-normalised if a Normalize module follows), else CLS and normalised
(vLLM's default for BERT embedding models)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.errors import ModelLoadError

# cross-encoders (rerankers): a query / document pair in, one relevance logit out (score.py routes)
CLASSIFIER_ARCHITECTURES = ("BertForSequenceClassification", "RobertaForSequenceClassification",
                            "XLMRobertaForSequenceClassification")
POOLING_ARCHITECTURES = ("BertModel", "RobertaModel", "XLMRobertaModel") + CLASSIFIER_ARCHITECTURES
# RoBERTa's position ids (XLM-R: bge-m3, bge-reranker) count from the padding id + 1, as transformers' do
_ROBERTA_MODEL_TYPES = ("roberta", "xlm-roberta")
_ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


@dataclass(frozen=True)
class PoolingConfig:
    method: str = "cls"      # "mean" | "cls" | "last" | "max"
    normalize: bool = True


def read_pooling_config(directory: str, default: PoolingConfig = PoolingConfig()) -> tuple[PoolingConfig, int | None]:
    """The pooling of a sentence-transformers folder (modules.json, its Pooling module's
    config.json) and its max_seq_length; `default` and None without one."""
    try:
        with open(os.path.join(directory, "modules.json"), encoding="utf-8") as f:
            modules = json.load(f)
    except (OSError, ValueError):
        return default, None
    method, normalize = default.method, False
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", ""))
        if kind.endswith(".Pooling"):
            try:
                with open(os.path.join(directory, module.get("path", ""), "config.json"), encoding="utf-8") as f:
                    pooling = json.load(f)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot read the pooling config of {directory}: {exc}") from exc
            modes = [name for name, key in (("mean", "pooling_mode_mean_tokens"), ("cls", "pooling_mode_cls_token"),
                                            ("last", "pooling_mode_lasttoken"), ("max", "pooling_mode_max_tokens"))
                     if pooling.get(key)]
            if len(modes) != 1 or pooling.get("pooling_mode_mean_sqrt_len_tokens") or \
                    pooling.get("pooling_mode_weightedmean_tokens"):
                raise ModelLoadError(f"{directory}: pooling {pooling} is not supported (one of mean, cls, last, max)")
            method = modes[0]
        elif kind.endswith(".Normalize"):
            normalize = True
    max_len = None
    try:
        with open(os.path.join(directory, "sentence_bert_config.json"), encoding="utf-8") as f:
            max_len = json.load(f).get("max_seq_length")
    except (OSError, ValueError):
        pass
    return PoolingConfig(method, normalize), max_len if isinstance(max_len, int) and max_len > 0 else None


def pool(hidden: torch.Tensor, mask: torch.Tensor, config: PoolingConfig,
         normalize: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, H] hidden states of a padded batch (mask [B, L], True on real tokens) -> [B, H]
    float32, L2-normalised as the config says or, given `normalize` ([B] bool), where it is true."""
    if config.method == "cls":
        pooled = hidden[:, 0]
    elif config.method == "last":
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1) - 1]
    elif config.method == "max":
        pooled = hidden.masked_fill(~mask[..., None], float("-inf")).amax(1)
    else:
        weights = mask[..., None].to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return normalized(pooled.float(), config, normalize)


def pool_ragged(hidden: torch.Tensor, lengths: list[int], config: PoolingConfig,
                normalize: torch.Tensor | None = None) -> torch.Tensor:
    """`pool` for a ragged batch: hidden [T, H] holds the sequences of `lengths` one after the
    other (an all-prefill step's tokens) -> [B, H] float32."""
    device = hidden.device
    counts = torch.tensor(lengths, device=device)
    ends = torch.cumsum(counts, 0)
    if config.method == "cls":
        pooled = hidden[ends - counts].float()
    elif config.method == "last":
        pooled = hidden[ends - 1].float()
    else:
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=device), counts)
        start = torch.full((len(lengths), hidden.shape[1]), float("-inf") if config.method == "max" else 0.0,
                           dtype=torch.float32, device=device)
        if config.method == "max":
            pooled = start.scatter_reduce_(0, rows[:, None].expand(-1, hidden.shape[1]), hidden.float(), "amax")
        else:
            pooled = start.index_add_(0, rows, hidden.float()) / counts[:, None]
    return normalized(pooled, config, normalize)


def normalized(pooled: torch.Tensor, config: PoolingConfig, normalize: torch.Tensor | None) -> torch.Tensor:
    """L2-normalised as the config says or, given `normalize` ([B] bool), where it is true."""
    if normalize is None:
        return F.normalize(pooled, p=2, dim=-1) if config.normalize else pooled
    return torch.where(normalize[:, None], F.normalize(pooled, p=2, dim=-1), pooled)


class _Attention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = (proj(x).view(batch, length, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return out.transpose(1, 2).reshape(batch, length, hidden)


class _Output(nn.Module):
    """dense -> + residual -> LayerNorm (transformers' BertSelfOutput / BertOutput)."""

    def __init__(self, inner: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(inner, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _AttentionBlock(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.add_module("self", _Attention(config))   # transformers' name: attention.self.query...
        self.output = _Output(config.hidden_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self._modules["self"](x, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.attention = _AttentionBlock(config)
        self.intermediate = _Intermediate(config)
        self.output = _Output(config.intermediate_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class _Embeddings(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        roberta = getattr(config, "model_type", "bert") in _ROBERTA_MODEL_TYPES
        self.padding_idx = int(getattr(config, "pad_token_id", 1) or 0) if roberta else None

    def forward(self, input_ids: torch.Tensor, token_types: torch.Tensor | None = None) -> torch.Tensor:
        if self.padding_idx is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        else:   # a token's position is padding_idx + its rank among the row's non-padding tokens
            real = input_ids.ne(self.padding_idx).long()
            positions = torch.cumsum(real, dim=1) * real + self.padding_idx
        # one segment (token type 0), or a pair's two (a cross-encoder's query and document)
        types = self.token_type_embeddings.weight[0] if token_types is None else self.token_type_embeddings(token_types)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + types
        return self.LayerNorm(x)


class _Encoder(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """transformers' BertModel without its pooler (unused by embeddings): hidden states of a
    padded batch."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ModelLoadError(f"BERT position_embedding_type {config.position_embedding_type!r} is not supported")
        if config.hidden_act not in _ACTIVATIONS:
            raise ModelLoadError(f"BERT hidden_act {config.hidden_act!r} is not supported ({', '.join(_ACTIVATIONS)})")
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, token_types: torch.Tensor | None = None
                ) -> torch.Tensor:
        x = self.embeddings(input_ids, token_types)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    def load_checkpoint(self, tensors: dict[str, torch.Tensor]) -> None:
        """A checkpoint's tensors by transformers' names ("bert." prefixes dropped; the pooler
        and position_ids buffers ignored); every parameter must be there."""
        state = {}
        for name, tensor in tensors.items():
            name = name.removeprefix("bert.").removeprefix("roberta.")
            if name.startswith(("pooler.", "cls.")) or name.endswith("position_ids"):
                continue
            state[name] = tensor
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelLoadError(f"BERT checkpoint does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")


class BertForSequenceClassification(nn.Module):
    """transformers' BertForSequenceClassification as a cross-encoder: the encoder, the pooler
    (dense + tanh over the first token) and the classifier -> [B, num_labels] logits; RoBERTa's
    and XLM-R's (`roberta`: their head is classifier.dense + tanh + classifier.out_proj on the
    first token, no pooler). Only num_labels == 1 (a relevance score) is served."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.bert = BertModel(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.roberta = getattr(config, "model_type", "bert") in _ROBERTA_MODEL_TYPES

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, token_types: torch.Tensor | None = None
                ) -> torch.Tensor:
        hidden = self.bert(input_ids, mask, token_types)
        return self.classifier(torch.tanh(self.pooler(hidden[:, 0])))

    def load_checkpoint(self, tensors: dict[str, torch.Tensor]) -> None:
        head = {"bert.pooler.dense.weight": "pooler.weight", "bert.pooler.dense.bias": "pooler.bias",
                "classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"}
        if self.roberta:
            head = {"classifier.dense.weight": "pooler.weight", "classifier.dense.bias": "pooler.bias",
                    "classifier.out_proj.weight": "classifier.weight", "classifier.out_proj.bias": "classifier.bias"}
        missing = sorted(set(head) - set(tensors))
        if missing:
            raise ModelLoadError(f"cross-encoder checkpoint lacks {', '.join(missing)}")
        self.load_state_dict({ours: tensors[theirs] for theirs, ours in head.items()}, strict=False)
        self.bert.load_checkpoint({name: t for name, t in tensors.items() if name not in head})
