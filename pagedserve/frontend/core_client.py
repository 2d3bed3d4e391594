"""CoreClient: EngineCore's face in the server process when the core runs in a process of
its own (frontend/core_process.py; the server's --engine-process). LLMEngine drives it
exactly as it drives an EngineCore (add_request, abort_requests, finish_requests, add_lora,
remove_lora, step, has_unfinished_requests, stats, request_snapshot, stop_snapshots, is_alive,
shutdown), from one thread; commands are sent at once, without waiting for the core.

step() returns what the core's steps produced since the last call: it blocks until one
outputs message arrives, then takes every other one already there (merged: outputs and
events in order, the latest stats), so a frontend that fell behind catches up in one pass.
`step_spans` then holds each of those core steps' StepSpan and stats (for the step timer).
A request is unfinished here from add_request until an output finishes it, the core answers
its abort, or it is finished from this side. A dead core process (its pipe closed, or its ("dead", why)) makes
step() raise EngineDeadError. The process runs core_process.main in a fresh interpreter (nothing is re-imported from the user's `__main__`, as for TP ranks), joined
by a socket pair that multiprocessing.connection frames; it exits by itself when this side
goes away (EOF).
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import socket
import subprocess
import sys
import weakref
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.core.outputs import EngineCoreOutputs, EngineStats, RequestEvent
from pagedserve.core.request import Request, RequestStatus
from pagedserve.engine_io import RequestId
from pagedserve.errors import EngineDeadError, ValidationError
from pagedserve.frontend.core_process import CoreInfo, StepSpan
from pagedserve.lora_request import LoadedLoRA

logger = logging.getLogger(__name__)
STARTUP_POLL_S = 0.5
CORE_MAIN = "import sys; from pagedserve.frontend.core_process import main; main(sys.argv[1:])"
SHUTDOWN_TIMEOUT_S = 10.0   # the core shuts its executor (TP ranks: <= 5 s) down before it exits


class CoreClient:
    def __init__(self, config: EngineConfig) -> None:
        self._sent_tokenizer_info = False
        ours, theirs = socket.socketpair()
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", CORE_MAIN, str(theirs.fileno()),
                 str(logging.getLogger("pagedserve").getEffectiveLevel())], pass_fds=(theirs.fileno(),), env=env)
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        self._finalizer = weakref.finalize(self, _stop, self._process, self._conn)
        self._conn.send(config)
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
                if self._process.poll() is not None:
                    raise EOFError
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            self.shutdown()
            raise EngineDeadError(f"the engine core process exited during start-up "
                                  f"(exit code {self._process.returncode}); see its log above") from None
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

    def abort_requests(self, request_ids: list[RequestId]) -> list[RequestEvent]:
        """EngineCore's answer (its FINISHED events) comes later, as a step's events."""
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        return []

    def finish_requests(self, request_ids: list[RequestId], status: RequestStatus) -> list[Request]:
        """Sent to the core (the core's Requests stay there). An abort is answered: its ids stay
        unfinished here until the core's ("aborted", ...) arrives with a FINISHED event and the
        token count of each that it still ran (a final-only request's metrics wait for them)."""
        if request_ids:
            if status == RequestStatus.FINISHED_ABORTED:
                self._send(("abort", request_ids))
            else:
                self._send(("finish", request_ids, status))
                self._live.difference_update(request_ids)
        return []

    def add_lora(self, lora: LoadedLoRA) -> None:
        """The adapter's factors go to the core (pickled: copied once into its process), ahead of
        the requests that run it."""
        self._send(("add_lora", lora))

    def remove_lora(self, lora_int_id: int) -> None:
        self._send(("remove_lora", lora_int_id))

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
        return self._dead is None and self._process.poll() is None

    def shutdown(self) -> None:
        self._finalizer()

    # ---- the pipe ------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        buffer = io.BytesIO()
        _Pickler(buffer, self).dump(message)
        try:
            self._conn.send_bytes(buffer.getbuffer())
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
            try:
                self._process.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
            self._die(f"the engine core process exited (exit code {self._process.returncode})")
        if message[0] == "dead":
            self._die(f"the engine core died: {message[1]}")
        if message[0] == "aborted":
            _, ids, outputs = message
            self._live.difference_update(ids)
            span = None
        else:
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


def _stop(process: subprocess.Popen, conn: Connection) -> None:
    """Ask the core to exit, then make sure: kill (it ignores SIGTERM). Idempotent."""
    try:
        conn.send(("shutdown",))
    except (OSError, ValueError):
        pass
    for signal_it, timeout in ((None, SHUTDOWN_TIMEOUT_S), (process.kill, 5.0)):
        if process.poll() is not None:
            break
        if signal_it is not None:
            logger.warning("the engine core did not exit; %s", signal_it.__name__)
            signal_it()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    conn.close()


class _Pickler(pickle.Pickler):
    """xgrammar's CompiledGrammar (Request.grammar) crosses the pipe as its JSON, the
    tokenizer's TokenizerInfo (megabytes for a large vocabulary) with the first grammar only;
    the core process keeps it (_load_grammar). Recognised by name: xgrammar is imported only
    where structured outputs are used."""

    def __init__(self, buffer: io.BytesIO, client: CoreClient) -> None:
        super().__init__(buffer, pickle.HIGHEST_PROTOCOL)
        self.client = client

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind.__name__ != "CompiledGrammar" or not kind.__module__.startswith("xgrammar"):
            return NotImplemented
        info = None if self.client._sent_tokenizer_info else obj.tokenizer_info.serialize_json()
        self.client._sent_tokenizer_info = True
        return _load_grammar, (obj.serialize_json(), info)


_tokenizer_info: Any = None   # in the core process: the TokenizerInfo the first grammar brought


def _load_grammar(text: str, tokenizer_info: str | None) -> Any:
    """In the core process: a CompiledGrammar back from its JSON."""
    import xgrammar
    global _tokenizer_info
    if tokenizer_info is not None:
        _tokenizer_info = xgrammar.TokenizerInfo.deserialize_json(tokenizer_info)
    return xgrammar.CompiledGrammar.deserialize_json(text, _tokenizer_info)
