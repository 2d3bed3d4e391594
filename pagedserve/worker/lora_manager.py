"""The model runner's LoRA adapters (vLLM's enable_lora): the model's layers get room for the
scheduler's device slots at load; this rank's host cache holds the adapters' factors, put there
between steps (ModelRunner.add_lora / remove_lora: EngineCore.add_lora, under tensor or pipeline
parallelism rank 0's message to every rank), read and checked once by the frontend when the
adapter was registered (frontend/lora_registry.py, which also decides what is kept); an adapter
named in SchedulerOutput.lora_loads is copied from there into its slot; each step's
token -> slot map goes to the model's LoraStep (layers/lora.py) before the forward.

Nothing is read from disk here, so no adapter's files can fail or slow a step, on any rank. An
adapter missing from the cache (the registry sends every adapter before its first request:
never expected) or a copy that fails raises ModelLoadError, which fails the step's request(s),
and marks the slot: the scheduler (core/lora_slots.py) believes the adapter is there, so a later
step that runs a row in that slot copies it again first and fails again while it cannot, rather
than run the slot's previous weights."""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from pagedserve.config import LoRAConfig
from pagedserve.errors import ModelLoadError
from pagedserve.lora_request import LoadedLoRA, LoRARequest
from pagedserve.worker.input_batch import StepInputs

logger = logging.getLogger(__name__)


class LoraManager:
    def __init__(self, model: nn.Module, config: LoRAConfig, max_step_tokens: int, device: torch.device) -> None:
        """Enables LoRA on `model` (its steps hold at most `max_step_tokens` tokens)."""
        self.model, self.config = model, config
        self.cache: dict[int, LoadedLoRA] = {}     # adapters' factors on the host, by id (the frontend's choice)
        self.failed: dict[int, LoRARequest] = {}   # slot -> the adapter whose copy into it failed
        model.enable_lora(config.max_loras, config.max_lora_rank, max_step_tokens, device)

    def add(self, lora: LoadedLoRA) -> None:
        self.cache[lora.lora_int_id] = lora

    def remove(self, lora_int_id: int) -> None:
        self.cache.pop(lora_int_id, None)

    def load(self, slot: int, lora_request: LoRARequest) -> None:
        """An adapter's factors from the host cache into a device slot of every LoRA layer of
        this rank. Raises ModelLoadError if it cannot (the slot is then marked failed)."""
        key = lora_request.lora_int_id
        self.failed.pop(slot, None)
        try:
            lora = self.cache.get(key)
            if lora is None:
                raise ModelLoadError(f"the LoRA adapter {lora_request.lora_name!r} (id {key}) is not in this rank's "
                                     "host cache: it must be registered (LLMEngine.add_lora) before a request runs it")
            self.model.set_lora(slot, lora.factors)
        except BaseException:
            self.failed[slot] = lora_request
            raise
        logger.info("LoRA adapter %s (id %d) copied into slot %d", lora_request.lora_name, key, slot)

    def set_step(self, inputs: StepInputs) -> None:
        """Each token's adapter slot this step (-1: none; None when no row has an adapter)."""
        slots = [row.lora_slot for row in inputs.rows]
        if self.failed:   # an adapter whose copy failed: copy it again, or fail
            for slot in self.failed.keys() & set(slots):
                self.load(slot, self.failed[slot])
        per_token = None
        if max(slots) >= 0:
            per_token = torch.from_numpy(np.repeat(np.array(slots, dtype=np.int64), inputs.query_lens)
                                         ).to(inputs.input_ids.device)
        self.model.lora_step.set(per_token)
