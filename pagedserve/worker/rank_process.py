"""A tensor-parallel rank that rank 0 starts on this machine, and how rank 0 watches it.

Each rank is a fresh `python -m pagedserve.worker --spawned ...` process, not a
multiprocessing child: it needs nothing from the user's `__main__`, so a script fed to Python
on standard input, an interactive session or a notebook start ranks like a script file does.

    rank 0 (RankProcess)                        rank r (python -m pagedserve.worker --spawned)
    stdin  pipe, held open -------------------> EOF: rank 0 is gone, exit at once
    stderr <----------------------------------- copied to rank 0's stderr line by line; the
                                                last lines are kept for rank 0's error message
    status pipe <------------------------------ start-up milestones: JOINING (imports done,
                                                about to join the group), LOADED (weights and
                                                KV budget ready, about to agree on the blocks)

Rank 0 enters each start-up collective (the rendezvous, the KV block all-reduce) only after
every rank reported the milestone before it, watching the processes while it waits: a rank
that dies while starting (an import error, a missing GPU, an out-of-memory while loading)
fails the engine within a fraction of a second with its exit code and its last lines, instead
of leaving rank 0 in a collective until the rendezvous timeout.
"""
from __future__ import annotations

import collections
import os
import select
import subprocess
import sys
import threading
import time
from typing import Sequence

from pagedserve.errors import EngineDeadError

JOINING, LOADED = b"J", b"L"
_MILESTONE_NAMES = {JOINING: "joined the group", LOADED: "loaded its shard"}
TAIL_LINES = 20


class RankProcess:
    def __init__(self, rank: int, argv: list[str]) -> None:
        """Start rank `rank`: `argv` are tp_worker's arguments (the status fd is added here)."""
        self.rank = rank
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._status_read, status_write = os.pipe()
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "pagedserve.worker", "--spawned", *argv,
                 "--status-fd", str(status_write)],
                stdin=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_write,), env=env)
        finally:
            os.close(status_write)
        self.milestones: set[bytes] = set()
        self._copier = threading.Thread(target=self._copy_stderr, name=f"pagedserve-tp-rank{rank}-stderr",
                                        daemon=True)
        self._copier.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def _copy_stderr(self) -> None:
        for raw in self.popen.stderr:
            line = raw.decode(errors="replace")
            self._tail.append(line.rstrip("\n"))
            try:
                sys.stderr.write(line)
            except (OSError, ValueError):   # our stderr is gone; keep draining the pipe
                pass

    def failure(self, when: str = "") -> str:
        """One paragraph on how this rank ended: rank, pid, exit code, its last lines."""
        self._copier.join(timeout=1.0)   # the last lines may still be in the pipe
        code = self.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        text = f"tensor-parallel rank {self.rank} (pid {self.pid}) {how}{when}"
        tail = [line for line in self._tail if line.strip()]
        if tail:
            text += "; its last output:\n  " + "\n  ".join(tail[-10:])
        return text

    def read_status(self) -> None:
        try:
            data = os.read(self._status_read, 64)
        except OSError:
            return
        self.milestones.update(bytes([b]) for b in data)

    def stop(self, timeout: float = 5.0) -> None:
        """Close its stdin (it exits on EOF), then kill it if it lingers (it ignores SIGTERM); reap it."""
        try:
            self.popen.stdin.close()
        except OSError:
            pass
        for signal_it in (None, self.popen.kill):
            if signal_it is not None:
                signal_it()
            try:
                self.popen.wait(timeout=timeout if signal_it is None else 2.0)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.close(self._status_read)
        except OSError:
            pass
        self._copier.join(timeout=1.0)


def first_exited(processes: Sequence[RankProcess], wait_s: float = 0.0) -> RankProcess | None:
    """The first rank process that has exited, waiting up to `wait_s` for one to."""
    deadline = time.monotonic() + wait_s
    while True:
        for process in processes:
            if process.exitcode is not None:
                return process
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def wait_for_milestone(processes: Sequence[RankProcess], milestone: bytes, timeout_s: float) -> None:
    """Return once every process reported `milestone`; raise EngineDeadError naming the first
    rank that exits first (or does not get there within `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    when = f" before it {_MILESTONE_NAMES[milestone]}"
    while True:
        pending = [p for p in processes if milestone not in p.milestones]
        if not pending:
            return
        dead = first_exited(processes)
        if dead is not None:
            raise EngineDeadError(dead.failure(when))
        if time.monotonic() > deadline:
            raise EngineDeadError(f"tensor-parallel rank {pending[0].rank} (pid {pending[0].pid}) did not "
                                  f"report that it {_MILESTONE_NAMES[milestone]} within {timeout_s:.0f} s")
        ready, _, _ = select.select([p._status_read for p in pending], [], [], 0.1)
        for process in pending:
            if process._status_read in ready:
                process.read_status()
