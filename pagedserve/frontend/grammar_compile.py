"""The server's grammar compiles in child processes, each under its request's deadline.

xgrammar's compile of a pathological regex or grammar (a few KB of alternatives) runs for
tens of seconds, cannot be interrupted inside its thread, and holds cores meanwhile. So
the server (GrammarCompiler.isolate) compiles in up to N children of its own:

    caller thread (AsyncEngine's compile pool)       child (python -m pagedserve.frontend.grammar_compile)
      take an idle child (or start one) by the deadline  TokenizerInfo from a payload file, a compiler
      frame (kind, value) -> child stdin   ---------->   compile_constraint(), at nice +10
      wait on child stdout until the deadline  <------   frame ("ok", CompiledGrammar JSON) | ("invalid", text)
      past the deadline or cancelled: kill the child (the next job starts another)

A child serves one job at a time and keeps xgrammar's compile cache while it lives. Frames
are a 4-byte little-endian length and a pickle. The child exits when its stdin closes (the
server shut it down or is gone); its stdout carries only frames (fd 1 goes to stderr)."""
from __future__ import annotations

import os
import pickle
import queue
import select
import subprocess
import sys
import threading
import time
import weakref
from typing import Any, Callable

from pagedserve.core.grammar_process import module_command, read_payload, write_payload
from pagedserve.errors import ValidationError
from pagedserve.frontend.structured_output import (CACHE_LIMIT_BYTES, GrammarCompileCancelled, GrammarCompiler,
                                                   GrammarCompileTimeout, compile_constraint)

CHILD_NICE = 10      # the engine thread and the tokenizers go first on a busy host
POLL_S = 0.05        # how often a waiting caller looks at its deadline and cancel flag


def isolate(compiler: GrammarCompiler, timeout_s: float, processes: int = 2) -> None:
    """`compiler` compiles in up to `processes` children from now on, each compile within
    `timeout_s` of its request (GrammarCompiler.isolate). Nothing changes without a
    tokenizer (no request can carry a grammar then) or if it is isolated already."""
    if compiler.tokenizer is not None and compiler.timeout_s is None:
        compiler.isolate(CompileProcesses(compiler.tokenizer_info_json, processes), timeout_s)


class _Child:
    def __init__(self, info_json: str) -> None:
        argv, env = module_command(__name__, write_payload(info_json.encode()))
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._finalizer = weakref.finalize(self, _kill, self.popen)

    def run(self, job: tuple[str, Any], deadline: float, cancel: threading.Event | None) -> tuple[str, str]:
        data = pickle.dumps(job)
        self.popen.stdin.write(len(data).to_bytes(4, "little") + data)
        self.popen.stdin.flush()
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


def _kill(popen: subprocess.Popen) -> None:
    try:
        popen.kill()
        popen.wait(5)
    except Exception:
        pass
    for stream in (popen.stdin, popen.stdout):
        try:
            stream.close()
        except Exception:
            pass


class CompileProcesses:
    """Up to `count` children, started on first need; thread-safe."""

    def __init__(self, info_json: Callable[[], str], count: int) -> None:
        self._info_json = info_json
        self._idle: queue.LifoQueue[_Child | None] = queue.LifoQueue()
        for _ in range(max(count, 1)):
            self._idle.put(None)
        self._closed = False

    def run(self, job: tuple[str, Any], deadline: float, cancel: threading.Event | None = None) -> tuple[str, str]:
        """("ok", the CompiledGrammar's JSON) or ("invalid", the ValidationError's message).
        Raises GrammarCompileTimeout / GrammarCompileCancelled (waiting for a child included),
        or RuntimeError if the child died on the job."""
        child = self._take(deadline, cancel)
        try:
            if child is None:
                child = _Child(self._info_json())
            return child.run(job, deadline, cancel)
        except BaseException:
            if child is not None:
                child.kill()
                child = None
            raise
        finally:
            if self._closed and child is not None:
                child.kill()
            else:
                self._idle.put(child)

    def _take(self, deadline: float, cancel: threading.Event | None) -> _Child | None:
        while True:
            if cancel is not None and cancel.is_set():
                raise GrammarCompileCancelled()
            left = deadline - time.monotonic()
            if left <= 0:
                raise GrammarCompileTimeout()
            try:
                return self._idle.get(timeout=min(left, POLL_S))
            except queue.Empty:
                continue

    def close(self) -> None:
        """Stop the idle children (busy ones stop when their job returns)."""
        self._closed = True
        while True:
            try:
                child = self._idle.get_nowait()
            except queue.Empty:
                return
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
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return   # stdin closed: the server is done with us
        kind, value = pickle.loads(stdin.read(int.from_bytes(head, "little")))
        try:
            reply = ("ok", compile_constraint(compiler, kind, value).serialize_json())
        except ValidationError as exc:
            reply = ("invalid", exc.message)
        data = pickle.dumps(reply)
        out.write(len(data).to_bytes(4, "little") + data)
        out.flush()


if __name__ == "__main__":
    _serve(sys.argv[1])
