"""Rank 0 -> ranks 1..N-1 step messages through shared memory (ranks on one machine), the way
vLLM's shm_broadcast does it: the step costs a pickle and a memcpy on rank 0 and a poll and an
unpickle on each worker, with no collective and no device sync on either side. The NCCL
broadcast it replaces (broadcast_object_list: sizes, then bytes, then a device -> host copy on
every worker) held each worker until its previous step had finished on the device, so a worker
only began building step n+1 after it knew step n's message; here it starts as soon as rank 0
writes, and runs ahead of the device.

Layout of the segment (one writer, `num_readers` readers, `num_slots` slots):

    [ack_0 .. ack_{R-1}]  int64 each: the last message number reader r has finished reading
    slot s: [seq int64][length int64][payload, slot_bytes]   message n lives in slot n % num_slots

Message numbers start at 1. The writer fills slot n % S only once every reader acked n - S
(so it never overwrites a slot being read), writes payload and length, then publishes `seq = n`.
A reader waits for `seq == n` in its slot, copies the payload out, then acks n. Aligned int64
stores are atomic on the machines we run on (x86-64, aarch64), and CPython's lock round trip
around each publish orders the stores as vLLM's memory_fence does. A message too large for a
slot is published with length -1 and travels through `fallback` (the step group's broadcast).
"""
from __future__ import annotations

import os
import pickle
import threading
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, Callable

import numpy as np

HEADER = 16   # seq, length
SPIN_S = 1.0   # poll without sleeping this long after the last message (steps come back to back)
IDLE_SLEEP_S = 0.0002  # then sleep between polls: an idle worker costs ~no CPU, a first step <= 0.2 ms later


_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier (a lock round trip), as vLLM's memory_fence."""
    with _fence_lock:
        pass


class ShmMessageQueue:
    """One writer (rank 0), `num_readers` readers; see the module docstring."""

    def __init__(self, num_readers: int, num_slots: int = 4, slot_bytes: int = 1 << 20,
                 name: str | None = None, reader: int | None = None) -> None:
        """The writer creates the segment (OSError if /dev/shm cannot hold it: its pages are
        reserved here, so a full /dev/shm fails now instead of a SIGBUS at a later write);
        a reader (`reader` = its index) attaches to `name`. A slot of 1 MiB holds a step of
        thousands of requests; larger ones (a long structured-output bitmask) overflow."""
        self.num_readers, self.num_slots, self.slot_bytes = num_readers, num_slots, slot_bytes
        size = 8 * num_readers + num_slots * (HEADER + slot_bytes)
        self.is_writer = reader is None
        if self.is_writer:
            self.shm = shared_memory.SharedMemory(create=True, size=size)   # zero-filled
            try:
                os.posix_fallocate(self.shm._fd, 0, size)  # noqa: SLF001
            except OSError:
                self.close()
                raise
        else:
            self.shm = _attach(name)
        self.reader = reader
        buf = self.shm.buf
        self.acks = np.ndarray((num_readers,), dtype=np.int64, buffer=buf, offset=0)
        if self.is_writer:
            self.acks[:] = 0
        base = 8 * num_readers
        self.heads = [np.ndarray((2,), dtype=np.int64, buffer=buf, offset=base + s * (HEADER + slot_bytes))
                      for s in range(num_slots)]
        if self.is_writer:
            for head in self.heads:
                head[:] = 0
        self.payload_offsets = [base + s * (HEADER + slot_bytes) + HEADER for s in range(num_slots)]
        self.count = 0   # messages written (writer) or read (reader)
        self._last = time.monotonic()

    @property
    def name(self) -> str:
        return self.shm.name

    def handle(self) -> QueueHandle:
        return QueueHandle(self.shm.name, self.num_readers, self.num_slots, self.slot_bytes)

    # ---- writer ---------------------------------------------------------------------------
    def send(self, message: Any, fallback: Callable[[Any], None], alive: Callable[[], None] = lambda: None,
             timeout_s: float = 600.0) -> None:
        """Publish `message` to every reader. Waits only while a reader is num_slots messages
        behind; `alive()` is called while waiting (it raises if a reader died), and a wait
        longer than `timeout_s` raises TimeoutError."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        n = self.count + 1
        slot = n % self.num_slots
        if n > self.num_slots:
            self._wait(lambda: int(self.acks.min()) >= n - self.num_slots, alive, timeout_s)
        head = self.heads[slot]
        big = len(data) > self.slot_bytes
        if not big:
            start = self.payload_offsets[slot]
            self.shm.buf[start:start + len(data)] = data
        head[1] = -1 if big else len(data)
        _fence()
        head[0] = n
        self.count = n
        if big:
            fallback(message)

    # ---- reader ---------------------------------------------------------------------------
    def recv(self, fallback: Callable[[], Any], alive: Callable[[], None] = lambda: None,
             timeout_s: float | None = None) -> Any:
        """The next message (blocks; polls, sleeping only after SPIN_S without messages)."""
        n = self.count + 1
        slot = n % self.num_slots
        head = self.heads[slot]
        self._wait(lambda: int(head[0]) == n, alive, timeout_s)
        _fence()
        length = int(head[1])
        if length >= 0:
            start = self.payload_offsets[slot]
            data = bytes(self.shm.buf[start:start + length])
        self.count = n
        self.acks[self.reader] = n
        return pickle.loads(data) if length >= 0 else fallback()

    def _wait(self, ready: Callable[[], bool], alive: Callable[[], None], timeout_s: float | None) -> None:
        if ready():
            self._last = time.monotonic()
            return
        start = time.monotonic()
        polls = 0
        while not ready():
            polls += 1
            now = time.monotonic()
            if now - self._last > SPIN_S:
                time.sleep(IDLE_SLEEP_S)
            elif polls % 64 == 0:
                time.sleep(0)   # yield: readers may share cores with rank 0
            if polls % 1024 == 0:
                alive()
                if timeout_s is not None and now - start > timeout_s:
                    raise TimeoutError(f"shared-memory step queue: no progress in {timeout_s:.0f} s")
        self._last = time.monotonic()

    def close(self) -> None:
        """Drop the views and the mapping; the writer also removes the segment."""
        self.acks = None
        self.heads = []
        try:
            self.shm.close()
        except BufferError:   # a numpy view still alive somewhere: the mapping goes at exit
            pass
        if self.is_writer:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


@dataclass(frozen=True)
class QueueHandle:
    """What a reader needs to attach to a queue (travels in the start-up message)."""

    name: str
    num_readers: int
    num_slots: int
    slot_bytes: int

    def attach(self, reader: int) -> ShmMessageQueue:
        return ShmMessageQueue(self.num_readers, self.num_slots, self.slot_bytes, self.name, reader)


def _attach(name: str) -> shared_memory.SharedMemory:
    """Open an existing segment without handing it to this process's resource tracker (which
    would unlink it when this reader exits; the writer owns it)."""
    try:
        return shared_memory.SharedMemory(name=name, track=False)   # Python >= 3.13
    except TypeError:
        shm = shared_memory.SharedMemory(name=name)
        try:
            from multiprocessing import resource_tracker
            resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001
        except Exception:
            pass
        return shm
