"""The embedding models' runners (vLLM's pooling runner): a batch of token id lists in, one
pooled vector per list out. No sampling, no policy: the frontend's EmbeddingEngine decides what
goes in a batch.

PoolingRunner: an encoder (BertModel), on a padded batch.
DecoderPoolingRunner: a decoder (Qwen3-Embedding, e5-mistral, ... : the generative models'
classes), the batch as one all-prefill step, ragged, on the paged attention path through a
scratch KV cache that holds one batch (no context, nothing kept between batches)."""
from __future__ import annotations

import glob
import logging
import os
import time
from typing import Any

import torch
from safetensors.torch import load_file

from pagedserve.attention.backend import select_backend
from pagedserve.attention.metadata import AttentionMetadata
from pagedserve.config import CacheConfig, ModelConfig, WeightSource
from pagedserve.errors import ModelLoadError
from pagedserve.models.bert import (CLASSIFIER_ARCHITECTURES, BertForSequenceClassification, BertModel, PoolingConfig,
                                   pool, pool_ragged)
from pagedserve.models.loader import load_weights
from pagedserve.models.registry import resolve_model_class
from pagedserve.worker.kv_pool import kv_zeros

logger = logging.getLogger(__name__)


def _checkpoint_tensors(directory: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if files:
        tensors: dict[str, torch.Tensor] = {}
        for path in files:
            tensors.update(load_file(path))
        return tensors
    bin_path = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise ModelLoadError(f"{directory} holds no *.safetensors nor pytorch_model.bin")


class PoolingRunner:
    def __init__(self, directory: str, hf_config: Any, pooling: PoolingConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        start = time.monotonic()
        self.device = device
        self.pooling = pooling
        self.pad_id = int(getattr(hf_config, "pad_token_id", 0) or 0)
        # a cross-encoder: pairs in (with token types), a relevance logit out (score.py routes)
        self.is_classifier = bool(set(getattr(hf_config, "architectures", None) or ()) & set(CLASSIFIER_ARCHITECTURES))
        model = (BertForSequenceClassification if self.is_classifier else BertModel)(hf_config)
        model.load_checkpoint(_checkpoint_tensors(directory))
        self.model = model.to(device=device, dtype=dtype).eval()
        self.dimensions = hf_config.num_labels if self.is_classifier else hf_config.hidden_size
        # a classifier's labels by index (id2label), "LABEL_i" where the config names none
        self.labels = [str((getattr(hf_config, "id2label", None) or {}).get(str(i), f"LABEL_{i}"))
                       for i in range(self.dimensions)] if self.is_classifier else []
        # one segment type (RoBERTa / XLM-R): a pair's second text has no type of its own
        self.token_types = int(getattr(hf_config, "type_vocab_size", 2)) > 1
        logger.info("%s loaded in %.1f s (%s)", "sequence classifier" if self.is_classifier else "embedding model",
                    time.monotonic() - start, f"{self.dimensions} labels" if self.is_classifier else
                    f"{pooling.method} pooling{', normalized' if pooling.normalize else ''}, {self.dimensions} "
                    "dimensions")

    @torch.inference_mode()
    def embed(self, batch: list[list[int]], normalize: list[bool] | None = None,
              token_types: list[list[int] | None] | None = None) -> list[list[float]]:
        """One vector per token id list (float32 values as Python floats), L2-normalised as the
        model's pooling says or, given `normalize`, where it is true; a cross-encoder's is its
        one logit, for a pair whose `token_types` (0: the first text, 1: the second) are given."""
        length = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)
        types = torch.zeros((len(batch), length), dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.bool)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, :len(ids)] = True
            if token_types is not None and token_types[row] is not None and self.token_types:
                types[row, :len(ids)] = torch.tensor(token_types[row], dtype=torch.long)
        input_ids, mask, types = input_ids.to(self.device), mask.to(self.device), types.to(self.device)
        if self.is_classifier:
            return self.model(input_ids, mask, types).float().cpu().tolist()
        rows = None if normalize is None else torch.tensor(normalize, dtype=torch.bool, device=self.device)
        return pool(self.model(input_ids, mask, types), mask, self.pooling, rows).cpu().tolist()


class DecoderPoolingRunner:
    """A decoder's final hidden states (after its last norm), pooled per sequence. The model is
    the generative one (models/registry.py) with its LM head tied to the embedding: it never
    computes logits, so a checkpoint's lm_head is skipped and holds no memory. The scratch KV
    cache holds `max_tokens` tokens in blocks of CacheConfig.block_size (each sequence rounds up
    to a block: `max_seqs` blocks more); on the CPU only the pages a batch writes are resident."""

    def __init__(self, directory: str, config: ModelConfig, pooling: PoolingConfig, max_tokens: int,
                 max_seqs: int, device: torch.device, seed: int = 0) -> None:
        start = time.monotonic()
        self.device, self.pooling = device, pooling
        self.block_size = CacheConfig.block_size
        torch.manual_seed(seed)
        with torch.device(device):
            model = resolve_model_class(config.architecture)(config)
        load_weights(model, WeightSource(directory, None, "auto", seed), config.dtype)
        self.model = model.eval()
        layers = model.attention_layers()
        num_blocks = -(-max_tokens // self.block_size) + max_seqs
        shape = (num_blocks, self.block_size, layers[0].num_kv_heads, layers[0].head_dim)
        self.kv_cache = kv_zeros((2 * len(layers), *shape), config.dtype, device)
        backend = select_backend(device, decodes=False)
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache, layer.backend = self.kv_cache[2 * i], self.kv_cache[2 * i + 1], backend
        self.dimensions = config.hidden_size
        logger.info("embedding model (%s) loaded in %.1f s (%s pooling%s, %d dimensions; scratch KV %d tokens)",
                    config.architecture, time.monotonic() - start, pooling.method,
                    ", normalized" if pooling.normalize else "", self.dimensions, num_blocks * self.block_size)

    is_classifier = False

    @torch.inference_mode()
    def embed(self, batch: list[list[int]], normalize: list[bool] | None = None,
              token_types: list[list[int] | None] | None = None) -> list[list[float]]:
        """One vector per token id list, as PoolingRunner.embed (no token types here): every list a fresh prompt in one
        forward (query_start_loc / seq_lens / block_tables of a step with no cached context)."""
        lengths = [len(ids) for ids in batch]
        blocks = [-(-n // self.block_size) for n in lengths]
        firsts = [sum(blocks[:row]) for row in range(len(batch))]
        table = torch.zeros((len(batch), max(blocks)), dtype=torch.int32)
        slots, positions = [], []
        for row, (n, first, count) in enumerate(zip(lengths, firsts, blocks)):
            table[row, :count] = torch.arange(first, first + count, dtype=torch.int32)
            slots.append(torch.arange(n) + first * self.block_size)
            positions.append(torch.arange(n))
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        device = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(device), query_start_loc=torch.tensor(starts, dtype=torch.int32).to(device),
            seq_lens=torch.tensor(lengths, dtype=torch.int32).to(device), block_tables=table.to(device),
            max_query_len=max(lengths), max_seq_len=max(lengths), num_decodes=0,
            query_start_loc_host=starts, seq_lens_host=lengths)
        ids = torch.tensor([t for row in batch for t in row], dtype=torch.long).to(device)
        hidden = self.model(ids, torch.cat(positions).to(device), meta)   # [T, H]
        rows = None if normalize is None else torch.tensor(normalize, dtype=torch.bool, device=device)
        return pool_ragged(hidden, lengths, self.pooling, rows).cpu().tolist()
