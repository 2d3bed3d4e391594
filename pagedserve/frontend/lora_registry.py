"""The engine's LoRA adapters (vLLM's add_lora): each one is read whole and checked against the
model once, when it is registered (LLMEngine.add_lora: the server's load route and
--lora-modules; offline, the first request that names it, in process_request), on the caller's
thread and never on the engine's; its factors are then kept on the host (LoadedLoRA), and every
rank's host cache gets them (EngineCore.add_lora) before the adapter's first request reaches the
core. Putting an adapter in a device slot inside a step is then a copy of tensors already read:
a step never waits for an adapter's files, and no rank ever reads one. A read or check that
fails is the registering caller's ValidationError, naming lora_request and the adapter; the
engine never sees that adapter. Files that change or vanish after the registration change
nothing while the adapter stays cached.

Memory: `max_cpu_loras` adapters are kept (vLLM's knob; the least recently used is dropped
first), but never one that a live request runs with (its rank copies may be needed again: after
a preemption, or once its device slot went to another adapter): while more adapters than that
are in use, they are all kept, until their requests end. An adapter dropped is read again, off
the engine thread like the first time, when a request names it next (its files must still be
there then; a read that fails fails that request alone, as a ValidationError). With the core in
a process of its own (the server's --engine-process), an adapter's factors are held twice on the
host, here and in the core's rank 0: this copy is what a request that got it before a drop
installs again, so no request ever waits for, or fails on, a file read on the driver thread.

Threads: get runs on any thread (under a lock); install / hold / release only on the engine's
driver thread, the one that talks to the core: the ranks' caches follow this one, an adapter
dropped here is removed there at the driver's next call."""
from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from typing import Protocol

from pagedserve.config import LoRAConfig, ModelConfig
from pagedserve.errors import ValidationError
from pagedserve.lora_request import LoadedLoRA, LoRARequest
from pagedserve.models.lora_adapter import load_adapter, lora_module_shapes

logger = logging.getLogger(__name__)


class LoraHost(Protocol):
    """Where the ranks' host caches are filled: EngineCore, or the CoreClient of its process."""

    def add_lora(self, lora: LoadedLoRA) -> None: ...

    def remove_lora(self, lora_int_id: int) -> None: ...


class LoraRegistry:
    def __init__(self, model: ModelConfig, config: LoRAConfig | None) -> None:
        self.model, self.config = model, config
        self._lock = threading.Lock()
        self._known: dict[int, str] = {}   # every adapter id registered -> its path (one id per adapter)
        self._cache: OrderedDict[int, LoadedLoRA] = OrderedDict()   # the host copies, least recently used first
        self._live: Counter[int] = Counter()   # adapter id -> requests running it (as the driver sees them)
        # driver thread only
        self._held: dict[str, int] = {}       # request id -> its adapter's id, until it ends
        self._installed: set[int] = set()     # the ids the ranks' host caches hold

    def get(self, lora_request: LoRARequest | None) -> LoadedLoRA | None:
        """The adapter a request runs with (None for None): its host copy, read and checked now
        if it is new here or was dropped since. Any thread. Raises ValidationError naming
        lora_request."""
        if lora_request is None:
            return None
        if not isinstance(lora_request, LoRARequest):
            raise ValidationError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}",
                                  "lora_request")
        if self.config is None:
            raise ValidationError("LoRA adapters need an engine started with enable_lora=True (--enable-lora)",
                                  "lora_request")
        key = lora_request.lora_int_id
        with self._lock:
            self._check_id(lora_request)
            loaded = self._cache.get(key)
            if loaded is not None:
                self._cache.move_to_end(key)
                return loaded
        loaded = self._read(lora_request)   # outside the lock: reads of other adapters go on meanwhile
        with self._lock:
            self._check_id(lora_request)   # another thread may have registered the id meanwhile
            self._known[key] = lora_request.lora_path
            loaded = self._cache.setdefault(key, loaded)
            self._cache.move_to_end(key)
            self._shrink(keep=key)
        return loaded

    def _check_id(self, lora_request: LoRARequest) -> None:
        known = self._known.get(lora_request.lora_int_id)
        if known is not None and known != lora_request.lora_path:
            raise ValidationError(f"lora_int_id {lora_request.lora_int_id} is already the adapter at {known!r}: one "
                                  "id per adapter", "lora_request")

    def _read(self, lora_request: LoRARequest) -> LoadedLoRA:
        try:
            factors = load_adapter(lora_request.lora_path, lora_module_shapes(self.model), self.config.max_lora_rank,
                                   dtype=self.model.dtype)[1]
        except ValidationError as exc:
            raise ValidationError(f"LoRA adapter {lora_request.lora_name!r}: {exc.message}", exc.param) from None
        logger.info("LoRA adapter %s (id %d) read from %s", lora_request.lora_name, lora_request.lora_int_id,
                    lora_request.lora_path)
        return LoadedLoRA(lora_request, factors)

    def _shrink(self, keep: int | None = None) -> None:
        """Under the lock: drop the least recently used adapters no request runs with (nor
        `keep`, the one just used) until max_cpu_loras are left, or none can go."""
        cache, live = self._cache, self._live
        while len(cache) > self.config.max_cpu_loras:
            victim = next((key for key in cache if key != keep and not live[key]), None)
            if victim is None:
                return
            del cache[victim]

    # ---- driver thread -------------------------------------------------------------------
    def install(self, lora: LoadedLoRA, core: LoraHost) -> None:
        """Before a request with `lora` goes to the core: the ranks' host caches get it if they
        lack it (the request's reference kept its factors, even if they were dropped here since)."""
        key = lora.lora_int_id
        with self._lock:
            self._cache[key] = self._cache.get(key, lora)
            self._cache.move_to_end(key)
        if key not in self._installed:
            core.add_lora(lora)
            self._installed.add(key)
        self._sync(core, keep=key)

    def hold(self, request_id: str, lora_int_id: int) -> None:
        """The request (in the core now) runs with the adapter until release()."""
        with self._lock:
            self._live[lora_int_id] += 1
        self._held[request_id] = lora_int_id

    def release(self, request_id: str, core: LoraHost) -> None:
        """The request ended (finished, failed, aborted); unknown ids are ignored."""
        key = self._held.pop(request_id, None)
        if key is None:
            return
        with self._lock:
            self._live[key] -= 1
            if not self._live[key]:
                del self._live[key]
        self._sync(core)

    def _sync(self, core: LoraHost, keep: int | None = None) -> None:
        """Back to max_cpu_loras here, and the ranks drop what is dropped here."""
        with self._lock:
            self._shrink(keep)
            stale = [key for key in self._installed if key not in self._cache and not self._live[key]]
        for key in stale:
            core.remove_lora(key)
            self._installed.discard(key)

    @property
    def has_held(self) -> bool:
        return bool(self._held)
