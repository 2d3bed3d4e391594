"""The model runner's LoRA adapters (vLLM's enable_lora): the model's layers get room for the
scheduler's device slots at load; an adapter named in SchedulerOutput.lora_loads is read (or
taken from the host cache of the `max_cpu_loras` most recent) and written into its slot; each
step's token -> slot map goes to the model's LoraStep (layers/lora.py) before the forward."""
from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from pagedserve.config import LoRAConfig, ModelConfig
from pagedserve.lora_request import LoRARequest
from pagedserve.models.lora_adapter import inspect_adapter, load_adapter, lora_module_shapes
from pagedserve.worker.input_batch import StepInputs

logger = logging.getLogger(__name__)


class LoraManager:
    def __init__(self, model: nn.Module, model_config: ModelConfig, config: LoRAConfig, max_step_tokens: int,
                 device: torch.device) -> None:
        """Enables LoRA on `model` (its steps hold at most `max_step_tokens` tokens)."""
        self.model, self.model_config, self.config = model, model_config, config
        self.cache: OrderedDict[int, dict] = OrderedDict()   # adapters' factors on the host, by id
        model.enable_lora(config.max_loras, config.max_lora_rank, max_step_tokens, device)

    def load(self, slot: int, lora_request: LoRARequest) -> None:
        """An adapter (checked by the frontend) into a device slot of every LoRA layer of this
        rank; its host copy is kept for the next time."""
        cache, key = self.cache, lora_request.lora_int_id
        factors = cache.pop(key, None)
        if factors is None:
            info = inspect_adapter(lora_request.lora_path, lora_module_shapes(self.model_config),
                                   self.config.max_lora_rank)
            factors = load_adapter(lora_request.lora_path, info.modules)
        cache[key] = factors
        while len(cache) > max(1, self.config.max_cpu_loras):
            cache.pop(next(iter(cache)))
        self.model.set_lora(slot, factors)
        logger.info("LoRA adapter %s (id %d) loaded into slot %d", lora_request.lora_name, key, slot)

    def set_step(self, inputs: StepInputs) -> None:
        """Each token's adapter slot this step (-1: none; None when no row has an adapter)."""
        slots = [row.lora_slot for row in inputs.rows]
        per_token = None
        if max(slots) >= 0:
            per_token = torch.from_numpy(np.repeat(np.array(slots, dtype=np.int64), inputs.query_lens)
                                         ).to(inputs.input_ids.device)
        self.model.lora_step.set(per_token)
