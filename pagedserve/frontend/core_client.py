"""CoreClient: EngineCore's face in the server process when the core runs in a process of
its own (frontend/core_process.py; the server's --engine-process). LLMEngine drives it
exactly as it drives an EngineCore (add_request, abort_requests, finish_requests, step,
has_unfinished_requests, stats, request_snapshot, stop_snapshots, is_alive, shutdown), from
one thread; commands are sent at once, without waiting for the core.

step() returns what the core's steps produced since the last call: it blocks until one
outputs message arrives, then takes every other one already there (merged: outputs and
events in order, the latest stats), so a frontend that fell behind catches up in one pass.
`step_spans` then holds each of those core steps' StepSpan and stats (for the step timer).
A request is unfinished here from add_request until an output finishes it, or it is aborted
or finished from this side. A dead core process (its pipe closed, or its ("dead", why)) makes
step() raise EngineDeadError; the process is spawned (a fresh interpreter), daemonic, and
exits by itself when this side goes away.
"""
from __future__ import annotations

import copyreg
import logging
import multiprocessing
import weakref
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.core.outputs import EngineCoreOutputs, EngineStats
from pagedserve.core.request import Request, RequestStatus
from pagedserve.engine_io import RequestId
from pagedserve.errors import EngineDeadError, ValidationError
from pagedserve.frontend.core_process import CoreInfo, StepSpan, run_core_process

logger = logging.getLogger(__name__)
STARTUP_POLL_S = 0.5
SHUTDOWN_TIMEOUT_S = 10.0   # the core shuts its executor (TP ranks: <= 5 s) down before it exits


class CoreClient:
    def __init__(self, config: EngineConfig) -> None:
        _register_grammar_pickling()
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=run_core_process, name="pagedserve-core", daemon=True,
                                        args=(config, child_conn, logging.getLogger("pagedserve").getEffectiveLevel()))
        self._process.start()
        child_conn.close()
        self._finalizer = weakref.finalize(self, _stop, self._process, self._conn)
        self._live: set[RequestId] = set()
        self._pending: deque[tuple[EngineCoreOutputs, StepSpan | None]] = deque()
        self._stats = EngineStats()
        self._dead: str | None = None
        self.step_spans: list[tuple[StepSpan, EngineStats]] = []
        self.info = self._wait_ready()
        self.weight_bytes = self.info.weight_bytes

    def _wait_ready(self) -> CoreInfo:
        try:
            while not self._conn.poll(STARTUP_POLL_S):
                if not self._process.is_alive():
                    raise EOFError
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            self.shutdown()
            raise EngineDeadError(f"the engine core process exited during start-up "
                                  f"(exit code {self._process.exitcode}); see its log above") from None
        if kind == "failed":
            self.shutdown()
            raise payload
        return payload

    @property
    def num_kv_blocks(self) -> int:
        return self.info.num_kv_blocks

    # ---- commands: sent at once ----------------------------------------------------------
    def add_request(self, request: Request, forks: list[Request] | None = None) -> None:
        """Raises ValidationError (as EngineCore does) for a prompt that can never fit."""
        needed = -(-(request.num_prompt_tokens + 1) // self.info.block_size)
        if needed > self.info.num_kv_blocks:
            raise ValidationError(
                f"the prompt ({request.num_prompt_tokens} tokens) can never fit in the KV cache "
                f"({self.info.num_kv_blocks * self.info.block_size} tokens)", "prompt")
        forks = forks or []
        self._send(("add", request, forks))
        self._live.update([request.request_id, *(f.request_id for f in forks)])

    def abort_requests(self, request_ids: list[RequestId]) -> list[Request]:
        return self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: list[RequestId], status: RequestStatus) -> list[Request]:
        """Sent to the core; nothing comes back for them (the core's Requests stay there)."""
        if request_ids:
            self._send(("abort",  request_ids) if status == RequestStatus.FINISHED_ABORTED
                       else ("finish", request_ids, status))
            self._live.difference_update(request_ids)
        return []

    def request_snapshot(self) -> None:
        self._send(("snapshot",))

    def stop_snapshots(self) -> None:
        self._send(("stop_snapshots",))

    # ---- reading the core ----------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        """Requests the core still runs, or messages from it not read yet."""
        return bool(self._live or self._pending) or (self._dead is None and self._poll())

    def stats(self) -> EngineStats:
        """The core's latest stats (messages already there are read; outputs kept for step())."""
        self._read_available()
        return self._stats

    def step(self) -> EngineCoreOutputs:
        """The outputs of every core step since the last call (blocks for the first)."""
        if not self._pending:
            self._receive(block=True)
        self._read_available()
        outputs, events, spans, snapshot = [], [], [], None
        while self._pending:
            part, span = self._pending.popleft()
            outputs += part.outputs
            events += part.events
            snapshot = part.stats.snapshot or snapshot
            if span is not None:
                spans.append((span, part.stats))
        for out in outputs:
            if out.finish_reason is not None:
                self._live.discard(out.req_id)
        self.step_spans = spans
        stats = self._stats
        if snapshot is not None and stats.snapshot is None:   # a merged step's snapshot is not lost
            stats = _with_snapshot(stats, snapshot)
        return EngineCoreOutputs(outputs, stats, events)

    def is_alive(self) -> bool:
        return self._dead is None and self._process.is_alive()

    def shutdown(self) -> None:
        self._finalizer()

    # ---- the pipe ------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        try:
            self._conn.send(message)
        except (OSError, ValueError) as exc:   # closed pipe: the process is gone
            self._die(f"the engine core process is gone ({type(exc).__name__}: {exc})")

    def _poll(self) -> bool:
        try:
            return self._conn.poll()
        except (OSError, ValueError):
            return True   # let _receive find out

    def _read_available(self) -> None:
        while self._dead is None and self._poll():
            self._receive(block=False)

    def _receive(self, block: bool) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        try:
            message = self._conn.recv()
        except (EOFError, OSError, ValueError):
            self._process.join(1.0)
            self._die(f"the engine core process exited (exit code {self._process.exitcode})")
        if message[0] == "dead":
            self._die(f"the engine core died: {message[1]}")
        _, outputs, span = message
        self._stats = outputs.stats
        self._pending.append((outputs, span))

    def _die(self, why: str) -> None:
        self._dead = why
        logger.error("%s", why)
        raise EngineDeadError(why)


def _with_snapshot(stats: EngineStats, snapshot: Any) -> EngineStats:
    from dataclasses import replace
    return replace(stats, snapshot=snapshot)


def _stop(process: multiprocessing.Process, conn: Connection) -> None:
    """Ask the core to exit, then make sure: terminate, kill. Idempotent."""
    try:
        conn.send(("shutdown",))
    except (OSError, ValueError):
        pass
    process.join(SHUTDOWN_TIMEOUT_S)
    if process.is_alive():
        logger.warning("the engine core did not exit in %.0f s; terminating it", SHUTDOWN_TIMEOUT_S)
        process.terminate()
        process.join(5.0)
    if process.is_alive():
        process.kill()
        process.join(5.0)
    conn.close()


_grammar_pickling = False


def _register_grammar_pickling() -> None:
    """xgrammar's CompiledGrammar (Request.grammar) crosses the pipe as its JSON."""
    global _grammar_pickling
    if _grammar_pickling:
        return
    try:
        import xgrammar
    except ImportError:
        return
    copyreg.pickle(xgrammar.CompiledGrammar, lambda grammar: (_load_grammar, (grammar.serialize_json(),)))
    _grammar_pickling = True


def _load_grammar(text: str) -> Any:
    import xgrammar
    return xgrammar.CompiledGrammar.deserialize_json(text)
