"""The model runner's LoRA adapters (vLLM's enable_lora): the model's layers get room for the
scheduler's device slots at load; an adapter named in SchedulerOutput.lora_loads is read (or
taken from the host cache of the `max_cpu_loras` most recent) and written into its slot; each
step's token -> slot map goes to the model's LoraStep (layers/lora.py) before the forward.

The read happens here, on the engine's thread, at an adapter's first use in a slot: its files
may have changed since the frontend checked them. What is read is checked again
(lora_adapter.load_adapter); a read that fails raises ModelLoadError, which fails the step's
request(s) with its text, and marks the slot: the scheduler (core/lora_slots.py) believes the
adapter is there, so a later step that runs a row in that slot reads it again first and fails
again while it cannot, rather than run the slot's previous weights. Under tensor or pipeline
parallelism every rank reads its own copy, and a rank whose read fails ends (tp_worker): the
engine stops. Reading the adapter once when it is loaded and keeping it on the host for every
rank would need an add_lora path from the frontend to the core and its ranks (vLLM's)."""
from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from pagedserve.config import LoRAConfig, ModelConfig
from pagedserve.errors import ModelLoadError, ValidationError
from pagedserve.lora_request import LoRARequest
from pagedserve.models.lora_adapter import load_adapter, lora_module_shapes
from pagedserve.worker.input_batch import StepInputs

logger = logging.getLogger(__name__)


class LoraManager:
    def __init__(self, model: nn.Module, model_config: ModelConfig, config: LoRAConfig, max_step_tokens: int,
                 device: torch.device) -> None:
        """Enables LoRA on `model` (its steps hold at most `max_step_tokens` tokens)."""
        self.model, self.model_config, self.config = model, model_config, config
        self.cache: OrderedDict[int, dict] = OrderedDict()   # adapters' factors on the host, by id
        self.failed: dict[int, LoRARequest] = {}   # slot -> the adapter whose load into it failed
        model.enable_lora(config.max_loras, config.max_lora_rank, max_step_tokens, device)

    def load(self, slot: int, lora_request: LoRARequest) -> None:
        """An adapter (checked by the frontend) into a device slot of every LoRA layer of this
        rank; its host copy is kept for the next time. Raises ModelLoadError if it cannot be read
        now (the slot is then marked failed)."""
        cache, key = self.cache, lora_request.lora_int_id
        self.failed.pop(slot, None)
        try:
            factors = cache.pop(key, None)
            if factors is None:
                try:
                    factors = load_adapter(lora_request.lora_path, lora_module_shapes(self.model_config),
                                           self.config.max_lora_rank)[1]
                except ValidationError as exc:
                    raise ModelLoadError(f"the LoRA adapter {lora_request.lora_name!r} could not be read from "
                                         f"{lora_request.lora_path!r} to run it: {exc}. It was checked when it was "
                                         "loaded, and its files have changed since: restore them, or unload the "
                                         "adapter and load it again") from exc
            cache[key] = factors
            while len(cache) > max(1, self.config.max_cpu_loras):
                cache.pop(next(iter(cache)))
            self.model.set_lora(slot, factors)
        except BaseException:
            self.failed[slot] = lora_request
            raise
        logger.info("LoRA adapter %s (id %d) loaded into slot %d", lora_request.lora_name, key, slot)

    def set_step(self, inputs: StepInputs) -> None:
        """Each token's adapter slot this step (-1: none; None when no row has an adapter)."""
        slots = [row.lora_slot for row in inputs.rows]
        if self.failed:   # an adapter whose load failed: read it again, or fail
            for slot in self.failed.keys() & set(slots):
                self.load(slot, self.failed[slot])
        per_token = None
        if max(slots) >= 0:
            per_token = torch.from_numpy(np.repeat(np.array(slots, dtype=np.int64), inputs.query_lens)
                                         ).to(inputs.input_ids.device)
        self.model.lora_step.set(per_token)
