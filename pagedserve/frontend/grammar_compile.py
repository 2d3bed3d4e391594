"""The server's grammar compiles in child processes, each under its request's deadline.

xgrammar's compile of a pathological regex or grammar (a few KB of alternatives) runs for
tens of seconds, cannot be interrupted inside its thread, and holds cores meanwhile. So
the server (GrammarCompiler.isolate) compiles in up to N children of its own:

    caller thread (AsyncEngine's compile pool)       child (python -m pagedserve.frontend.grammar_compile)
      take an idle child (smallest job first) in time    TokenizerInfo from a payload file, a compiler
      frame (kind, value) -> child stdin   ---------->   compile_constraint(), at nice +10
      wait on child stdout, `timeout` at most  <------   frame ("ok", CompiledGrammar JSON) | ("invalid", text)
      past it or cancelled: kill the child (the next job starts another)

A compile is bounded by the timeout and waiting for a child by twice that: a request whose
grammar compiles quickly waits at most one round of others' slow compiles (and goes first
among the waiting: smallest job first), then compiles; past the wait it is refused as an
overload (503 with Retry-After), past the compile as its own (400 naming its field).

A child serves one job at a time and keeps xgrammar's compile cache while it lives; its first
frame says it has started (its start, ~1.5 s of imports, is not counted as compile time). Frames
are a 4-byte little-endian length and a pickle. The child exits when its stdin closes (the
server shut it down or is gone); its stdout carries only frames (fd 1 goes to stderr)."""
from __future__ import annotations

import heapq
import itertools
import os
import pickle
import select
import subprocess
import sys
import threading
import time
import weakref
from typing import Any, Callable

from pagedserve.core.grammar_process import discard_payload, module_command, read_payload, write_payload
from pagedserve.errors import ValidationError
from pagedserve.frontend.structured_output import (CACHE_LIMIT_BYTES, GrammarCompileBusy, GrammarCompileCancelled,
                                                   GrammarCompiler, GrammarCompileTimeout, compile_constraint)

CHILD_NICE = 10      # the engine thread and the tokenizers go first on a busy host
POLL_S = 0.05        # how often a waiting caller looks at its deadline and cancel flag
STARTUP_S = 120.0    # a new child's start (imports, the tokenizer's info) is not the compile's time


def isolate(compiler: GrammarCompiler, timeout_s: float, processes: int = 2) -> None:
    """`compiler` compiles in up to `processes` children from now on, each compile within
    `timeout_s` of its request (GrammarCompiler.isolate). Nothing changes without a
    tokenizer (no request can carry a grammar then) or if it is isolated already."""
    if compiler.tokenizer is not None and compiler.timeout_s is None:
        compiler.isolate(CompileProcesses(compiler.tokenizer_info_json, processes), timeout_s)


class _Child:
    def __init__(self, info_json: str) -> None:
        info_path = write_payload(info_json.encode())   # the child removes it once read
        argv, env = module_command(__name__, info_path)
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._finalizer = weakref.finalize(self, _kill, self.popen, info_path)
        self.ready = False

    def run(self, data: bytes, timeout_s: float, cancel: threading.Event | None) -> tuple[str, str]:
        """`data`: a pickled job, given `timeout_s` once the child has started."""
        if not self.ready:   # its first frame says it has started
            self._frame(time.monotonic() + STARTUP_S, cancel)
            self.ready = True
        self.popen.stdin.write(len(data).to_bytes(4, "little") + data)
        self.popen.stdin.flush()
        return self._frame(time.monotonic() + timeout_s, cancel)

    def _frame(self, deadline: float, cancel: threading.Event | None) -> Any:
        head = self._read(4, deadline, cancel)
        return pickle.loads(self._read(int.from_bytes(head, "little"), deadline, cancel))

    def _read(self, size: int, deadline: float, cancel: threading.Event | None) -> bytes:
        fd, out = self.popen.stdout.fileno(), bytearray()
        while len(out) < size:
            if cancel is not None and cancel.is_set():
                raise GrammarCompileCancelled()
            left = deadline - time.monotonic()
            if left <= 0:
                raise GrammarCompileTimeout()
            if select.select([fd], [], [], min(left, POLL_S))[0]:
                chunk = os.read(fd, size - len(out))
                if not chunk:
                    raise RuntimeError(f"the grammar compile process exited ({self.popen.wait()})")
                out += chunk
        return bytes(out)

    def kill(self) -> None:
        self._finalizer()


def _kill(popen: subprocess.Popen, info_path: str) -> None:
    try:
        popen.kill()
        popen.wait(5)
    except Exception:
        pass
    discard_payload(info_path)
    for stream in (popen.stdin, popen.stdout):
        try:
            stream.close()
        except Exception:
            pass


class CompileProcesses:
    """`count` children, all started at the first job (and one again after each one killed);
    thread-safe. Waiting callers take a free child smallest job first, so a quick grammar
    goes ahead of slow ones still waiting."""

    def __init__(self, info_json: Callable[[], str], count: int) -> None:
        self._info_json = info_json
        self._cond = threading.Condition()
        self._idle: list[_Child | None] = [None] * max(count, 1)
        self._waiting: list[tuple[int, int]] = []   # heap of (job size, arrival)
        self._arrivals = itertools.count()
        self._closed = False

    def run(self, job: tuple[str, Any], timeout_s: float, cancel: threading.Event | None = None) -> tuple[str, str]:
        """("ok", the CompiledGrammar's JSON) or ("invalid", the ValidationError's message).
        Waits up to twice `timeout_s` for a free child (one round of others' compiles;
        GrammarCompileBusy past it), then gives the compile `timeout_s` once the child has
        started (GrammarCompileTimeout past it; the child is killed); raises
        GrammarCompileCancelled once `cancel` is set, or RuntimeError if the child died."""
        data = pickle.dumps(job)
        with self._cond:   # the first job starts them all: a burst after it finds them started
            if not self._closed and all(child is None for child in self._idle):
                self._idle = [_Child(self._info_json()) for _ in self._idle]
        child = self._take(len(data), time.monotonic() + 2 * timeout_s, cancel)
        try:
            if child is None:
                child = _Child(self._info_json())
            return child.run(data, timeout_s, cancel)
        except BaseException:
            if child is not None:
                child.kill()
                child = None
            raise
        finally:
            with self._cond:
                if self._closed and child is not None:
                    child.kill()
                else:
                    self._idle.append(child)
                    self._cond.notify_all()

    def _take(self, size: int, deadline: float, cancel: threading.Event | None) -> _Child | None:
        me = (size, next(self._arrivals))
        with self._cond:
            heapq.heappush(self._waiting, me)
            try:
                while not (self._idle and self._waiting[0] == me):
                    if cancel is not None and cancel.is_set():
                        raise GrammarCompileCancelled()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise GrammarCompileBusy()
                    self._cond.wait(min(left, POLL_S))
                return self._idle.pop()
            finally:
                self._waiting.remove(me)
                heapq.heapify(self._waiting)
                self._cond.notify_all()

    def close(self) -> None:
        """Stop the idle children (busy ones stop when their job returns)."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
        for child in idle:
            if child is not None:
                child.kill()


# ---- the child ----------------------------------------------------------------------------
def _serve(info_path: str) -> None:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)   # whatever else writes to stdout lands on stderr, not in our frames
    try:
        os.nice(CHILD_NICE)
    except OSError:
        pass
    import xgrammar
    info = xgrammar.TokenizerInfo.deserialize_json(read_payload(info_path).decode())
    compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_limit_bytes=CACHE_LIMIT_BYTES)
    stdin = sys.stdin.buffer

    def send(reply: tuple[str, str]) -> None:
        data = pickle.dumps(reply)
        out.write(len(data).to_bytes(4, "little") + data)
        out.flush()

    send(("ready", ""))
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return   # stdin closed: the server is done with us
        kind, value = pickle.loads(stdin.read(int.from_bytes(head, "little")))
        try:
            reply = ("ok", compile_constraint(compiler, kind, value).serialize_json())
        except ValidationError as exc:
            reply = ("invalid", exc.message)
        send(reply)


if __name__ == "__main__":
    _serve(sys.argv[1])
