"""Structured outputs on the worker (rank 0): a step whose sampling waits for its grammar
bitmask (DeferredSample: the forward is queued, the host fills the mask meanwhile), and each
step's bitmask on its way to the device (GrammarMask: page-locked in place when it is the
grammar process's shared buffer, else staged through a pinned copy), handed to the sampler,
which applies it before sampling (or, greedy on CUDA, reads it in the argmax)."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from pagedserve.engine_io import ModelRunnerOutput, RequestId
from pagedserve.layers.sampler import token_bitmask_to_device
from pagedserve.worker.input_batch import CachedRequestState

logger = logging.getLogger(__name__)
# page-lock a grammar bitmask buffer in place (GrammarMask.host_registered); benchmarks switch it off
REGISTER_GRAMMAR_MASK = True


class DeferredSample:
    """A step whose forward pass is queued and whose sampling waits for the grammar bitmask
    (engine_io.DeferredSampling): the host fills the mask while the device computes. The
    runner launches nothing else until `sample` (the engine samples a step before it
    launches the next one, whose inputs may be this step's sampled ids)."""

    def __init__(self, sample: Callable[..., Any], output: ModelRunnerOutput, logits: torch.Tensor,
                 states: list[CachedRequestState], structured_req_ids: list[RequestId]) -> None:
        # sample: the runner's _sample (output, logits, states, rows, bitmask, sampled_ids) ->
        # its PendingRunnerOutput; passed in, so this module does not import the runner's
        self._sample, self.output, self.logits, self.states = sample, output, logits, states
        self.grammar_rows = grammar_rows(states, structured_req_ids)

    @torch.inference_mode()
    def sample(self, grammar_bitmask: torch.Tensor | None, sampled_ids: torch.Tensor | None = None) -> Any:
        return self._sample(self.output, self.logits, self.states, self.grammar_rows, grammar_bitmask, sampled_ids)

    def ready(self) -> bool:
        return False   # not even sampled yet

    def get(self) -> ModelRunnerOutput:
        return self.sample(None).get()


def grammar_rows(states: list[CachedRequestState], structured_req_ids: list[RequestId]) -> list[int]:
    """The sampled row of each structured_req_ids entry (-1: not sampled in this step)."""
    req_ids = [state.req_id for state in states]
    if req_ids == structured_req_ids:
        return list(range(len(req_ids)))
    row_of = {rid: row for row, rid in enumerate(req_ids)}
    return [row_of.get(rid, -1) for rid in structured_req_ids]


class GrammarMask:
    """The runner's grammar bitmasks on their way to the device: the pinned staging buffer
    (reused step to step) and the host buffer page-locked in place, if any."""

    def __init__(self, device: torch.device, max_rows: int) -> None:
        self.device, self.max_rows = device, max_rows
        self._staging: tuple[torch.Tensor | None, torch.cuda.Event | None] = (None, None)   # see _staging_buffer
        self._registered: tuple[int, Any, bool] | None = None   # see host_registered

    def to_device(self, logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor | None:
        """The token bitmask of every logits row on the device (mask row i for logits row
        rows[i], -1 rows: not sampled here; the other logits rows all allowed), for the
        sampler to apply before sampling and logprobs (every sampler path, greedy argmax
        included, obeys it); None if no row here is constrained."""
        if -1 in rows:
            keep = [i for i, row in enumerate(rows) if row >= 0]
            bitmask, rows = bitmask[torch.tensor(keep)], [rows[i] for i in keep]
        if not rows:
            return None
        if len(rows) == logits.shape[0] and rows == list(range(len(rows))) and self.host_registered(bitmask):
            return token_bitmask_to_device(logits, bitmask, rows)   # an async copy straight from it
        staging = self._staging_buffer(logits.shape[0], bitmask.shape[1])
        mask = token_bitmask_to_device(logits, bitmask, rows, staging)
        if staging is not None:
            self._staging[1].record()   # after the copy from it, for the next reuse
        return mask

    def host_registered(self, bitmask: torch.Tensor) -> bool:
        """On CUDA, a bitmask in a page-aligned host buffer of its own (the grammar process's
        shared mask) is page-locked in place once (cudaHostRegister; the buffer is held, and
        unregistered when another one comes), so it needs no staging copy. Safe to read
        asynchronously: its producer refills it only after this step's tokens are back."""
        if self.device.type != "cuda" or not REGISTER_GRAMMAR_MASK or not bitmask.is_contiguous():
            return False
        storage = bitmask.untyped_storage()
        pointer = storage.data_ptr()
        held = self._registered
        if held is not None and held[0] == pointer:
            return held[2]
        if pointer % 4096:
            return False
        from pagedserve.worker.host_kv_cache import _register, _unregister
        if held is not None and held[2]:
            _unregister(held[0])
        try:
            _register(pointer, storage.nbytes())
            registered = True
        except RuntimeError:
            logger.warning("could not page-lock the grammar bitmask buffer; it is staged through a pinned copy")
            registered = False
        self._registered = (pointer, storage, registered)
        return registered

    @property
    def registered(self) -> bool | None:
        """Whether the last host buffer offered was page-locked in place (None: none offered)."""
        return None if self._registered is None else self._registered[2]

    def _staging_buffer(self, num_rows: int, width: int) -> torch.Tensor | None:
        """On CUDA, a pinned host buffer for the step's bitmask, reused once the copy from it
        of an earlier step is done (normally long done: that step was waited for)."""
        if self.device.type != "cuda":
            return None
        staging, event = self._staging
        if staging is None or staging.shape[0] < num_rows or staging.shape[1] != width:
            staging = torch.empty((max(num_rows, self.max_rows), width), dtype=torch.int32, pin_memory=True)
            self._staging = (staging, torch.cuda.Event())
        else:
            event.synchronize()
        return staging
