"""The server's embedding engine: `embed` from the event loop, batches on one thread that forms
each batch round-robin over the requests waiting, one input of each in turn, so a request of
2,048 inputs shares every batch with the ones that came after it instead of going first
(EmbeddingEngine checks, tokenizes and runs them: embedding_engine.py)."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from pagedserve.engine_args import EngineArgs
from pagedserve.errors import EngineDeadError, RequestFailedError
from pagedserve.frontend.embedding_engine import EmbeddingEngine
from pagedserve.frontend.input_processor import InputProcessor
from pagedserve.frontend.stoppable import in_pool, run_stoppable

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Input:
    ids: list[int]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    normalize: bool
    types: list[int] | None = None   # a cross-encoder pair's token types


class AsyncEmbeddingEngine:
    """The server's: `embed` from the event loop; batches run on one thread, round-robin
    over the requests waiting (one input of each in turn)."""

    def __init__(self, engine: EmbeddingEngine) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._queues: OrderedDict[int, deque[_Input]] = OrderedDict()   # request -> inputs not yet run
        self._next_key = 0
        self._stopping = False
        self._dead: EngineDeadError | None = None
        self._processing = ThreadPoolExecutor(2, thread_name_prefix="pagedserve-tokenize")
        self._thread = threading.Thread(target=self._run, name="pagedserve-embed", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncEmbeddingEngine":
        return cls(EmbeddingEngine(args))

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer for the server's routes (/tokenize, /detokenize): its encoding
        calls take the engine's tokenizer lock, as process_prompt's do (a fast tokenizer's
        truncation is state each call sets: an unlocked call would undo a request's cut)."""
        tokenizer = self.engine.tokenizer
        return None if tokenizer is None else _LockedTokenizer(tokenizer, self.engine._tokenizer_lock)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def num_waiting(self) -> int:
        with self._cond:
            return sum(len(queue) for queue in self._queues.values())

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    async def process(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` in the tokenizing pool (never on the event loop)."""
        return await in_pool(self._processing, function, *args)

    async def process_stoppable(self, function: Callable[[threading.Event], T]) -> T:
        """`function(stop)` in the tokenizing pool; cancelled (its client left), `stop` is set,
        so a function that loops over until_stopped(items, stop) ends before its next item
        rather than tokenizing a request nobody waits for."""
        return await run_stoppable(self._processing, function)

    async def render_chat_async(self, messages: list[dict], chat_template: str | None = None,
                                add_generation_prompt: bool = True, continue_final_message: bool = False,
                                tools: list[dict] | None = None, documents: list[dict] | None = None,
                                chat_template_kwargs: dict | None = None) -> str:
        """/tokenize's `messages` through the model's chat template (InputProcessor.render_chat,
        as the generating engine renders them), in the tokenizing pool."""
        processor = InputProcessor(self.engine.tokenizer, self.engine.vocab_size, self.max_model_len, ())
        return await self.process(processor.render_chat, messages, chat_template, add_generation_prompt,
                                  continue_final_message, tools, documents, chat_template_kwargs)

    async def embed(self, id_lists: list[list[int]], normalize: bool | None = None,
                    token_types: list[list[int]] | None = None) -> list[list[float]]:
        """One vector per token id list (each already checked by process_prompt), normalised
        as the model's pooling says unless `normalize` says otherwise. Cancelled, its inputs
        not yet run are dropped."""
        if self._dead is not None:
            raise self._dead
        loop = asyncio.get_running_loop()
        if normalize is None:
            normalize = self.engine.runner.pooling.normalize
        inputs = [_Input(ids, loop.create_future(), loop, normalize, token_types[i] if token_types else None)
                  for i, ids in enumerate(id_lists)]
        with self._cond:
            if self._stopping:
                raise EngineDeadError("the embedding engine is shutting down")
            key, self._next_key = self._next_key, self._next_key + 1
            self._queues[key] = deque(inputs)
            self._cond.notify()
        try:
            return list(await asyncio.gather(*(item.future for item in inputs)))
        finally:
            with self._cond:
                self._queues.pop(key, None)

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._processing.shutdown(wait=False, cancel_futures=True)

    def _take_batch(self) -> list[_Input]:
        """Round-robin over the requests, one input of each in turn, while the batch fits."""
        engine, batch, longest = self.engine, [], 0
        while self._queues and len(batch) < engine.max_num_seqs:
            key, queue = next(iter(self._queues.items()))
            item = queue[0]
            widest = max(longest, len(item.ids))
            if batch and widest * (len(batch) + 1) > engine.max_num_batched_tokens:
                break
            queue.popleft()
            if queue:
                self._queues.move_to_end(key)
            else:
                del self._queues[key]
            if not item.future.cancelled():
                batch.append(item)
                longest = widest
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queues and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                batch = self._take_batch()
            if not batch:
                continue
            try:
                vectors = self.engine.runner.embed([item.ids for item in batch], [item.normalize for item in batch],
                                                   [item.types for item in batch])
            except Exception as exc:   # this batch's requests fail; the engine goes on
                logger.exception("an embedding batch of %d inputs failed", len(batch))
                failed = RequestFailedError(f"the embedding batch failed: {type(exc).__name__}: {exc}")
                for item in batch:
                    _settle_threadsafe(item, None, failed)
                continue
            for item, vector in zip(batch, vectors):
                _settle_threadsafe(item, vector, None)
        error = EngineDeadError("the embedding engine has stopped")
        self._dead = error
        with self._cond:
            for queue in self._queues.values():
                for item in queue:
                    _settle_threadsafe(item, None, error)
            self._queues.clear()


class _LockedTokenizer:
    """A tokenizer whose encoding calls (`tokenizer(...)`, `encode`) hold `lock`; anything else
    is the tokenizer's own."""

    def __init__(self, tokenizer: Any, lock: threading.Lock) -> None:
        self._tokenizer, self._lock = tokenizer, lock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._tokenizer.encode(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def _settle_threadsafe(item: _Input, value: Any, error: BaseException | None) -> None:
    try:
        item.loop.call_soon_threadsafe(_settle, item.future, value, error)
    except RuntimeError:   # its event loop is closed: nobody waits any more
        pass


def _settle(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
