"""One server process for the benchmark scripts that start `pagedserve serve` (or vLLM's):
a free port, the process in its own session with its output in a log file, waiting until an
endpoint answers 200 (the log's tail reported when it dies or times out), and a stop:
SIGTERM to the server, a wait, then SIGKILL to what is left of its session. Used by serve_gpu.py, serve_memory.py
and shutdown_gpu.py (tests/server/conftest.py keeps its own: tests do not import benchmarks/).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NoReturn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`argv` started in its own session (so that stop() ends its children too), stdout and
    stderr to `log_path` (first `header`, if given) or, without one, this process's own."""

    def __init__(self, argv: list[str], port: int, env: dict | None = None, cwd=None,
                 log_path: str | Path | None = None, header: str | None = None, name: str = "server") -> None:
        self.name, self.port = name, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path) if log_path is not None else None
        self.log = open(self.log_path, "w") if self.log_path is not None else None
        if self.log is not None and header is not None:
            self.log.write(header + "\n")
            self.log.flush()
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self.log,
                                     stderr=subprocess.STDOUT if self.log is not None else None,
                                     start_new_session=True)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        if self.log is None:
            return ""
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float, path: str = "/health") -> float:
        """Seconds from launch until GET `path` answers 200. RuntimeError (its message: the log's
        last line; the last 20 on stderr) when the process exits first or timeout_s passes."""
        deadline = self.t0 + timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.base_url + path, timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - self.t0
            except OSError:
                pass
            time.sleep(0.1)
        self._fail(f"not ready after {timeout_s:.0f} s")

    def _fail(self, what: str) -> NoReturn:
        tail = self.log_text().strip().splitlines()[-20:]
        if tail:
            print(f"---- {self.name} log, last {len(tail)} lines ({self.log_path})\n" + "\n".join(tail),
                  file=sys.stderr, flush=True)
        raise RuntimeError(f"{self.name} {what}" + (f": {tail[-1][-300:]}" if tail else ""))

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self._signal_group(signal.SIGKILL)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the server (it stops its own engine core), up to timeout_s for the exit, then
        SIGKILL to whatever is left of the session; closes the log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)   # stragglers (or a server that did not exit)
        self.proc.wait(timeout=10)
        if self.log is not None:
            self.log.close()
