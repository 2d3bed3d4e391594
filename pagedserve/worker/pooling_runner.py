"""The embedding models' runner (vLLM's pooling runner): an encoder's weights, a padded batch of
token id lists in, one pooled vector per list out. No KV cache, no sampling, no policy: the
frontend's EmbeddingEngine decides what goes in a batch."""
from __future__ import annotations

import glob
import logging
import os
import time
from typing import Any

import torch
from safetensors.torch import load_file

from pagedserve.errors import ModelLoadError
from pagedserve.models.bert import BertModel, PoolingConfig, pool

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
        model = BertModel(hf_config)
        model.load_checkpoint(_checkpoint_tensors(directory))
        self.model = model.to(device=device, dtype=dtype).eval()
        self.dimensions = hf_config.hidden_size
        logger.info("embedding model loaded in %.1f s (%s pooling%s, %d dimensions)", time.monotonic() - start,
                    pooling.method, ", normalized" if pooling.normalize else "", self.dimensions)

    @torch.inference_mode()
    def embed(self, batch: list[list[int]], normalize: list[bool] | None = None) -> list[list[float]]:
        """One vector per token id list (float32 values as Python floats), L2-normalised as the
        model's pooling says or, given `normalize`, where it is true."""
        length = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.bool)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, :len(ids)] = True
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        rows = None if normalize is None else torch.tensor(normalize, dtype=torch.bool, device=self.device)
        return pool(self.model(input_ids, mask), mask, self.pooling, rows).cpu().tolist()
