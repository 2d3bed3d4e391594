"""The engine behind the server: LLMEngine's step loop on one background thread, and an
asyncio face for it (one output stream per request).

    event loop thread                         engine thread ("pagedserve-engine")
    -----------------                         -----------------------------------
    add_request() --command--> [commands] --> drain commands (add / abort)
    abort()       --command-->     |          step()  (torch releases the GIL)
    RequestStream <--call_soon_threadsafe---- deliver this step's outputs in one batch

LLMEngine is not thread-safe: only the engine thread touches it. Every engine call made on
behalf of the event loop is a command, drained at the top of each iteration, so an abort
frees its blocks before the next step runs. When there are no commands and no unfinished
requests the thread sleeps on a condition variable (no spinning).

Failure model: an error while adding, or an engine-side failure of one request, fails that
request's stream only (RequestFailedError, with the failed step's error text). An exception
out of step() kills the loop: `is_healthy` turns False and every open or later request gets
EngineDeadError.

Prompt processing (chat template rendering, tokenization, validation) runs in a small
worker pool, never on the event loop nor on the engine thread: a huge prompt or a slow
template stalls neither /health nor the running streams. The engine thread only queues the
processed request (LLMEngine.add_processed). For the server's own use:

    async def tokenize_prompt(prompt: str, add_special_tokens: bool = True, keep_last: int | None = None) -> list[int]
    async def render_chat_async(messages, chat_template=None, add_generation_prompt=True,
                                continue_final_message=False, tools=None, documents=None,
                                chat_template_kwargs=None) -> str
        (a request's own chat_template renders under a deadline and size caps:
        ValidationError("chat_template") past them; see frontend/chat_template.py)

The loop reads only what LLMEngine.step_with_stats() returns: the outputs and the core's
EngineStats (kept as `self.stats` for /metrics). Request timing lives in
frontend/request_metrics.py, which feeds the finish listeners. `step_timer`
(frontend/step_timing.py) keeps each core step's times and the output processing after it.

With `engine_process=True` the core runs in its own process (frontend/core_client.py): the
engine thread here then only sends commands and turns the core's outputs into RequestOutputs
(detokenizing), and the core's steps never wait for this process's GIL. Idle, the thread
wakes every IDLE_POLL_S to read what the core sent (the stats after an abort).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

from pagedserve.lora_request import LoRARequest
from pagedserve.core.outputs import EngineStats
from pagedserve.core.snapshot import EngineSnapshot
from pagedserve.engine_args import EngineArgs
from pagedserve.errors import EngineDeadError, RequestFailedError, ValidationError
from pagedserve.frontend.grammar_compile import isolate
from pagedserve.frontend.heap import release_free_heap
from pagedserve.frontend.input_processor import PromptType
from pagedserve.frontend.llm_engine import LLMEngine
from pagedserve.frontend.output_processor import OutputKind
from pagedserve.frontend.prompt_bound import prompt_length_bound
from pagedserve.frontend.request_metrics import FinishListener, FirstTokenListener
from pagedserve.frontend.step_timing import StepTime, StepTimer
from pagedserve.frontend.stoppable import in_pool, run_stoppable
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger(__name__)
_END = object()
PROCESSING_THREADS = 4   # rendering + tokenization; tokenizers release the GIL while encoding
COMPILE_WAITERS = 32     # threads that wait on grammar compile processes (frontend/grammar_compile.py)
IDLE_POLL_S = 0.05       # engine process: an idle engine thread reads the core's messages this often
CPU_SAMPLE_S = 0.5       # the engine thread's CPU time is sampled this often (step timer)
IDLE_TRIM_S = 1.0        # idle this long after its last step, the engine thread trims the C heap (heap.py)


class RequestStream:
    """Async iterator over one request's RequestOutputs; raises the request's error if it
    fails. Consumed on the event loop that created it. Closing it early aborts the request."""

    def __init__(self, request_id: str, engine: "AsyncEngine", loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.finished = False

    def put(self, item: Any) -> None:
        """Event-loop side only (reached through call_soon_threadsafe)."""
        self._queue.put_nowait(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self.finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def close(self) -> None:
        """Abort the request unless it already finished. Safe to call twice."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, start: bool = True, probe_gil: bool = False,
                 grammar_compile_timeout: float = EngineArgs.grammar_compile_timeout) -> None:
        self.engine = engine
        # a grammar compiles in a child process under a deadline, awaited on a pool of its own:
        # a slow one never holds up the tokenizing of other requests (frontend/grammar_compile.py)
        isolate(engine.grammar_compiler, grammar_compile_timeout)
        self._compiling = ThreadPoolExecutor(COMPILE_WAITERS, thread_name_prefix="pagedserve-grammars")
        self.step_timer = StepTimer(probe_gil)
        self._death_listeners: list[Callable[[EngineDeadError], None]] = []
        self._cond = threading.Condition()
        # (run on the engine thread, or fail with the death error) -- guarded by _cond
        self._commands: deque[tuple[Callable[[], None], Callable[[EngineDeadError], None]]] = deque()
        self._streams: dict[str, RequestStream] = {}   # engine thread only
        self._stopping = False
        self._dead: EngineDeadError | None = None
        self.stats = EngineStats()   # the core's, replaced (never mutated) after every loop iteration
        self._step_listeners: list[Callable[[EngineStats], None]] = []
        self._snapshot_listeners: list[Callable[[EngineSnapshot], None]] = []
        self._processing = ThreadPoolExecutor(PROCESSING_THREADS, thread_name_prefix="pagedserve-inputs")
        self._thread = threading.Thread(target=self._run, name="pagedserve-engine", daemon=True)
        if start:
            self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, engine_process: bool = False, probe_gil: bool = False) -> "AsyncEngine":
        """`engine_process`: the core in a process of its own; `probe_gil`: the step timer's GIL probe."""
        return cls(LLMEngine(args, engine_process=engine_process), probe_gil=probe_gil,
                   grammar_compile_timeout=args.grammar_compile_timeout)

    # ---- read-only facts, safe from any thread ------------------------------------------
    @property
    def is_healthy(self) -> bool:
        """The loop runs and the executor (every TP rank) is alive; cheap, any thread."""
        return self._dead is None and self._thread.is_alive() and self.engine.is_alive()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_num_seqs(self) -> int:
        return self.engine.max_num_seqs

    @property
    def device_type(self) -> str:
        """"cpu" or "cuda": where the model runs."""
        return self.engine.config.device.device.split(":")[0]

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def render_chat(self, messages: list[dict], chat_template: str | None = None,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    tools: list[dict] | None = None, documents: list[dict] | None = None,
                    chat_template_kwargs: dict | None = None) -> str:
        """Chat template -> prompt text (`tools`: OpenAI function tools, for templates that
        render them; documents and chat_template_kwargs: InputProcessor.render_chat). Safe off
        the engine thread: rendering reads only the tokenizer's template. Raises ValidationError."""
        return self.engine.input_processor.render_chat(messages, chat_template, add_generation_prompt,
                                                       continue_final_message, tools, documents, chat_template_kwargs)

    async def render_chat_async(self, messages: list[dict], chat_template: str | None = None,
                                add_generation_prompt: bool = True, continue_final_message: bool = False,
                                tools: list[dict] | None = None, documents: list[dict] | None = None,
                                chat_template_kwargs: dict | None = None) -> str:
        """render_chat in the worker pool (a request's template under its bounds)."""
        return await self._in_pool(self.render_chat, messages, chat_template, add_generation_prompt,
                                   continue_final_message, tools, documents, chat_template_kwargs)

    async def tokenize_prompt(self, prompt: str, add_special_tokens: bool = True,
                              keep_last: int | None = None) -> list[int]:
        """Text -> token ids in the worker pool; `keep_last` k: only the last k, read from a
        suffix of the text where that is exact (PromptLengthBound.last_ids: a 15 MB prompt cut
        to its last tokens need not hold a tokenizing thread for seconds). Raises ValidationError
        without a tokenizer."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValidationError("tokenizing needs a tokenizer (skip_tokenizer_init=True)", "prompt")

        if keep_last is not None:
            return await self._in_pool(prompt_length_bound(tokenizer).last_ids, prompt, keep_last, add_special_tokens)
        return await self._in_pool(lambda: list(tokenizer.encode(prompt, add_special_tokens=add_special_tokens)))

    async def compile_grammar(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar (cached), from a compile process (grammar_compile.py): a
        ValidationError naming the field if it does not compile within the compile timeout,
        OverloadedError if no process came free within it. Cancelling this kills the compile."""
        return await run_stoppable(self._compiling, self.engine.grammar_compiler.compile, params)

    async def _in_pool(self, function: Callable[..., Any], *args: Any) -> Any:
        return await in_pool(self._processing, function, *args)

    def add_finish_listener(self, listener: FinishListener) -> None:
        """Called on the engine thread for each finished, aborted or failed request; must be quick."""
        self.engine.add_finish_listener(listener)

    def add_first_token_listener(self, listener: FirstTokenListener) -> None:
        """Called on the engine thread with each request's time to first token as it arrives; must be quick."""
        self.engine.add_first_token_listener(listener)

    def add_step_listener(self, listener: Callable[[EngineStats], None]) -> None:
        """Called on the engine thread with the core's stats after every step; must be quick."""
        self._step_listeners.append(listener)

    def add_death_listener(self, listener: Callable[[EngineDeadError], None]) -> None:
        """Called once, on the engine thread, when the step loop dies (not at shutdown)."""
        self._death_listeners.append(listener)

    def add_snapshot_listener(self, listener: Callable[[EngineSnapshot], None]) -> None:
        """Called on the engine thread with each EngineSnapshot asked for by request_snapshot()
        (after the next step, or at once when idle); must be quick."""
        self._snapshot_listeners.append(listener)

    def request_snapshot(self) -> None:
        """From any thread: the engine thread builds one EngineSnapshot soon (after its next
        step, or now if idle) and logs steps for the next ones until stop_snapshots()."""
        self._submit(self.engine.request_snapshot, on_dead=_ignore)

    def stop_snapshots(self) -> None:
        """From any thread: nobody watches; the step loop stops logging for snapshots."""
        self._submit(self.engine.stop_snapshots, on_dead=_ignore)

    # ---- the event-loop API --------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                          output_kind: OutputKind = OutputKind.DELTA, strict_length: bool = False,
                          add_special_tokens: bool = True, priority: int = 0,
                          lora_request: LoRARequest | None = None) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it. Raises the
        ValidationError of a bad request (nothing is queued then) or EngineDeadError."""
        if self._dead is not None:
            raise self._dead
        grammar = None
        if params.structured_outputs is not None:
            grammar = await self.compile_grammar(params.structured_outputs)
        processed = await self._in_pool(self.engine.process_request, request_id, prompt, params, output_kind,
                                        strict_length, add_special_tokens, priority, lora_request, grammar)
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, self, loop)
        accepted: asyncio.Future[None] = loop.create_future()

        def add() -> None:
            try:
                self.engine.add_processed(processed)
            except Exception as exc:
                _settle_threadsafe(loop, accepted, exc)
                return
            self._streams[request_id] = stream
            _settle_threadsafe(loop, accepted, None)

        self._submit(add, on_dead=lambda exc: _settle_threadsafe(loop, accepted, exc))
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)   # queued after the add: undoes it if it went through
            raise
        return stream

    async def generate(self, prompt: PromptType, params: SamplingParams, request_id: str | None = None,
                       output_kind: OutputKind = OutputKind.DELTA, strict_length: bool = False,
                       add_special_tokens: bool = True, priority: int = 0,
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come. Validation errors are raised before the first
        output; leaving the loop early (or being cancelled) aborts the request."""
        request_id = request_id or uuid.uuid4().hex
        stream = await self.add_request(request_id, prompt, params, output_kind, strict_length, add_special_tokens,
                                        priority, lora_request)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; its blocks are freed before the next step.
        Unknown or finished ids are ignored."""
        self._submit(lambda: self._abort_now(request_id), on_dead=_ignore)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop (open requests get EngineDeadError) and release the engine. Idempotent."""
        with self._cond:
            already, self._stopping = self._stopping, True
            self._cond.notify()
        if already:
            return
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._processing.shutdown(wait=False, cancel_futures=True)
        self._compiling.shutdown(wait=False, cancel_futures=True)
        self.step_timer.close()
        if not self._thread.is_alive():
            self.engine.shutdown()

    # ---- engine thread -----------------------------------------------------------------
    def _submit(self, command: Callable[[], None], on_dead: Callable[[EngineDeadError], None]) -> None:
        with self._cond:
            if self._dead is None and not self._stopping:
                self._commands.append((command, on_dead))
                self._cond.notify()
                return
            dead = self._dead or EngineDeadError("the engine is shutting down")
        on_dead(dead)

    def _run(self) -> None:
        idle_wait = IDLE_POLL_S if self.engine.engine_process else None
        cpu_sampled = 0.0
        trim_at: float | None = None   # IDLE_TRIM_S after the last step of a burst (serve trims after start-up)
        try:
            while True:
                with self._cond:
                    # a step with an empty core produces nothing: never spin on it
                    trim = self._wait_for_work(idle_wait, trim_at)
                    if not trim:
                        if self._stopping:
                            break
                        commands = list(self._commands)
                        self._commands.clear()
                if trim:   # idle for IDLE_TRIM_S: give the freed heap pages back (outside the lock)
                    trim_at = None
                    release_free_heap()
                    continue
                for command, _ in commands:
                    command()
                if self.engine.has_work():
                    outputs, self.stats = self.engine.step_with_stats()
                    trim_at = time.monotonic() + IDLE_TRIM_S
                    self._dispatch(outputs)
                    self._time_steps()
                    for _, stats in self.engine.step_spans:   # one call per core step (an engine process may merge some)
                        self._notify(self._step_listeners, stats)
                    if self.step_timer.steps and self.step_timer.steps[-1].end - cpu_sampled > CPU_SAMPLE_S:
                        cpu_sampled = self.step_timer.steps[-1].end
                        self.step_timer.sample_cpu("engine_thread")
                else:   # the commands changed what is queued (an abort freed blocks)
                    self.stats = self.engine.stats()
                if self.stats.snapshot is not None:
                    self._notify(self._snapshot_listeners, self.stats.snapshot)
        except BaseException as exc:   # the loop is gone: fail everyone, loudly
            logger.exception("engine loop died")
            self._die(exc)
        finally:
            self._fail_open_requests(self._dead or EngineDeadError("the engine was shut down"))
        if not self._stopping:
            self._notify(self._death_listeners, self._dead)

    def _wait_for_work(self, idle_wait: float | None, trim_at: float | None) -> bool:
        """Under self._cond: sleep until there are commands, work or a stop (False), or until
        `trim_at` passes with none of them (True)."""
        while not (self._commands or self._stopping or self.engine.has_work()):
            if trim_at is None:
                self._cond.wait(idle_wait)
                continue
            left = trim_at - time.monotonic()
            if left <= 0:
                return True
            self._cond.wait(left if idle_wait is None else min(left, idle_wait))
        return False

    def _time_steps(self) -> None:
        """The core steps behind the last step_with_stats(), with the time from each one's
        end until its outputs were handed to the event loop (now)."""
        done = time.perf_counter()
        timer = self.step_timer
        for span, stats in self.engine.step_spans:
            timer.record(StepTime(span.begin, span.end, stats.num_batched_tokens, stats.num_running, done - span.end))
            if span.cpu:
                timer.sample_cpu("engine_core_process", span.end, span.cpu)

    @staticmethod
    def _notify(listeners: list[Callable[[Any], None]], value: Any) -> None:
        """Each listener in turn; one that raises is logged, the others still run."""
        for listener in listeners:
            try:
                listener(value)
            except Exception:
                logger.exception("listener %r failed", listener)

    def _abort_now(self, request_id: str) -> None:
        """Abort on the caller's behalf: free the blocks, end its stream (unknown ids: nothing)."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        try:
            self.engine.abort_request(request_id)
        except Exception:   # keep serving the others
            logger.exception("aborting request %s failed", request_id)
        _post(stream, _END)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand this step's outputs to their streams: one call_soon_threadsafe per loop."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            item: Any = output
            if output.finished:
                del self._streams[output.request_id]
                # an abort we did not ask for (ours are untracked first): the engine failed it
                if output.error_param is not None:   # the request's own parameters did it: a 4xx
                    item = ValidationError(output.error or "invalid request", output.error_param)
                elif output.error is not None or any(c.finish_reason == "abort" for c in output.outputs):
                    item = RequestFailedError(f"request {output.request_id} failed in the engine"
                                              + (f": {output.error}" if output.error else ""))
            batches.setdefault(stream._loop, []).append((stream, item))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:   # that event loop is closed; nobody is listening
                for stream, _ in batch:
                    self._abort_now(stream.request_id)

    def _die(self, exc: BaseException) -> None:
        with self._cond:
            self._dead = EngineDeadError(f"the engine loop died: {type(exc).__name__}: {exc}")

    def _fail_open_requests(self, error: EngineDeadError) -> None:
        """Every open stream and every queued command gets `error`; later submits too."""
        with self._cond:
            if self._dead is None:
                self._dead = error
            leftover = list(self._commands)
            self._commands.clear()
        for _, on_dead in leftover:
            on_dead(self._dead)
        for stream in list(self._streams.values()):
            _post(stream, self._dead)
        self._streams.clear()


def _ignore(error: EngineDeadError) -> None:
    return None


def _settle_threadsafe(loop: asyncio.AbstractEventLoop, future: asyncio.Future,
                       error: BaseException | None) -> None:
    try:
        loop.call_soon_threadsafe(_settle, future, error)
    except RuntimeError:   # that event loop is closed; nobody waits
        pass


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _post(stream: RequestStream, item: Any) -> None:
    """Engine thread -> the stream's event loop; a closed loop has nobody left to tell."""
    try:
        stream._loop.call_soon_threadsafe(stream.put, item)
    except RuntimeError:
        pass


def _deliver(batch: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in batch:
        stream.put(item)
