"""The engine core in a process of its own (the server's --engine-process; vLLM V1's
EngineCoreProc): EngineCore's step loop, busy while it has requests, fed and read through
one duplex pipe by frontend/core_client.py's CoreClient in the server process, where HTTP,
tokenization and detokenization run. The core's step then never waits for the server's
GIL (the event loop's JSON and socket writes, the output processing).

main([FD, LOG_LEVEL]) in a fresh interpreter (core_client.CORE_MAIN): FD is this side of a socket pair
(multiprocessing.connection framing); the first message is the EngineConfig. Messages, pickled
tuples (the core's own dataclasses inside):

    client -> core   ("add", Request, [forks])    ("abort", [ids])    ("finish", [ids], RequestStatus)
                     ("add_lora", LoadedLoRA)   ("remove_lora", lora_int_id)
                     ("snapshot",)   ("stop_snapshots",)   ("shutdown",)
    core -> client   ("ready", CoreInfo)   ("failed", exception)   ("dead", text)
                     ("outputs", EngineCoreOutputs, StepSpan | None)   one per step, or the
                     stats after commands that found the core idle
                     ("aborted", [ids], EngineCoreOutputs)   the answer to each abort: its
                     events (EngineCore.abort_requests), a FINISHED one per id with its token count

Lifetime: the process exits on ("shutdown",), when the pipe closes (the server died, even
by SIGKILL: the next poll sees EOF) or when its loop raises (after sending ("dead", text));
its executor (TP ranks) is shut down on the way out. Ctrl-C reaches the whole process
group, and so does systemd's stop (SIGTERM to every process of the unit): the core ignores
SIGINT and SIGTERM and lets the server end it, so open requests can finish (the server's
graceful shutdown waits for them, then stops the core; a core that does not stop is killed).
"""
from __future__ import annotations

import gc
import logging
import pickle
import queue
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from pagedserve.config import EngineConfig
from pagedserve.core.outputs import EngineCoreOutput, EngineCoreOutputs
from pagedserve.frontend.gc_policy import raise_gen0_threshold

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CoreInfo:
    """What the client needs to know of the core at start-up."""
    num_kv_blocks: int
    block_size: int
    weight_bytes: int


@dataclass(frozen=True, slots=True)
class StepSpan:
    """One core step: perf_counter at its start and end (CLOCK_MONOTONIC: comparable across
    processes) and the core thread's CPU time at its end."""
    begin: float
    end: float
    cpu: float


def main(argv: list[str]) -> None:
    """Build the core, report, serve the pipe until told to stop (or the client is gone)."""
    from pagedserve.core.engine_core import EngineCore
    from pagedserve.logger import configure_default_logging
    for signum in (signal.SIGINT, signal.SIGTERM):   # the server's to handle: it ends us
        signal.signal(signum, signal.SIG_IGN)
    configure_default_logging()
    logging.getLogger("pagedserve").setLevel(int(argv[1]))
    conn = Connection(int(argv[0]))
    try:
        config: EngineConfig = conn.recv()
    except (EOFError, OSError):
        return   # the client is gone already
    try:
        core = EngineCore(config)
    except BaseException as exc:   # noqa: BLE001 - reported to the client, which re-raises it
        conn.send(("failed", _picklable(exc)))
        return
    # as the server does (serve.py): start-up's objects live as long as the process; frozen, no
    # full collection walks them again (a walk holds the GIL ~0.1-0.4 s, a stalled step)
    gc.collect()
    gc.freeze()
    raise_gen0_threshold()   # no gen-0 collection every step (frontend/gc_policy.py)
    outbox = None
    try:
        conn.send(("ready", CoreInfo(core.num_kv_blocks, config.cache.block_size, core.weight_bytes)))
        outbox = _Outbox(conn)
        _serve_on_a_thread(core, conn, outbox)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.info("the server is gone; the engine core exits")
    except BaseException as exc:   # noqa: BLE001 - the core is dead: say why, then exit
        logger.exception("engine core died")
        if outbox is not None:
            outbox.put(("dead", f"{type(exc).__name__}: {exc}"))
    finally:
        if outbox is not None:
            outbox.close()
        core.shutdown()


class _Outbox:
    """Messages to the client, sent by a thread of their own (vLLM's output thread): the step
    loop never blocks on a full pipe, so it keeps reading the client's messages, and a client
    blocked sending a large one (a request's prompt, the first grammar's TokenizerInfo) while
    the loop's outputs fill the pipe cannot deadlock the two."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.gone = False   # the client stopped reading (its end closed)
        self._thread = threading.Thread(target=self._run, name="pagedserve-core-out", daemon=True)
        self._thread.start()

    def put(self, message: tuple) -> None:
        self._queue.put(message)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (within `timeout`), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                self._conn.send(message)
            except OSError:
                self.gone = True
                return


def _serve_on_a_thread(core, conn: Connection, outbox: _Outbox) -> None:
    """_serve on a thread other than the one that built the core, as in the server process
    (which builds it on the main thread and steps it on "pagedserve-engine"): on a busy
    2-core CPU machine the building thread ran the tiny llama's steps ~6x slower (decode step
    P50 140 vs 22 ms, benchmarks/serve_steps.py --cpu; torch's OpenMP team of that thread)."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            _serve(core, conn, outbox)
        except BaseException as exc:   # noqa: BLE001 - re-raised on the main thread
            raised.append(exc)
    thread = threading.Thread(target=run, name="pagedserve-core-loop")
    thread.start()
    thread.join()
    if raised:
        raise raised[0]


IDLE_CHECK_S = 0.1   # an idle core checks its ranks' liveness this often


def _serve(core, conn: Connection, outbox: _Outbox) -> None:
    while not outbox.gone:
        if not core.has_unfinished_requests():   # idle: wait for the client, watching the ranks
            while not conn.poll(IDLE_CHECK_S):
                if not core.is_alive():   # a dead TP / PP rank: the client (and /health) hear it now
                    raise RuntimeError("an engine rank died")
        messages = []
        while conn.poll():
            messages.append(conn.recv())
        for message in messages:
            if message[0] == "shutdown":
                return
            _apply(core, outbox, message)
        if core.has_unfinished_requests():
            begin = time.perf_counter()
            outputs = core.step()
            outbox.put(("outputs", outputs, StepSpan(begin, time.perf_counter(), time.thread_time())))
        elif messages:   # e.g. an abort freed blocks: the client's stats (and /metrics) see it
            outbox.put(("outputs", EngineCoreOutputs([], core.stats(), []), None))
    raise BrokenPipeError("the client stopped reading")


def _apply(core, outbox: _Outbox, message: tuple) -> None:
    kind = message[0]
    if kind == "add":
        _, request, forks = message
        try:
            core.add_request(request, forks)
        except Exception as exc:   # the client checks what it can first; anything else fails the request
            error = f"{type(exc).__name__}: {exc}"
            failed = [EngineCoreOutput(r.request_id, finish_reason="abort", error=error) for r in [request, *forks]]
            outbox.put(("outputs", EngineCoreOutputs(failed, core.stats(), []), None))
    elif kind == "abort":   # answered at once: the client waits for it (its metrics need the token counts)
        events = core.abort_requests(message[1])
        outbox.put(("aborted", message[1], EngineCoreOutputs([], core.stats(), events)))
    elif kind == "finish":
        core.finish_requests(message[1], message[2])
    elif kind == "add_lora":
        core.add_lora(message[1])
    elif kind == "remove_lora":
        core.remove_lora(message[1])
    elif kind == "snapshot":
        core.request_snapshot()
    elif kind == "stop_snapshots":
        core.stop_snapshots()
    else:
        raise ValueError(f"unknown message {kind!r}")


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:   # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")
