"""Structured outputs off the engine thread: a grammar process with its own GIL.

On a host-bound step (an H200 running a llama-1b shape at ~1.4 ms per step) the xgrammar
work of 64 constrained rows, ~0.3 ms of fill and ~0.13 ms of accept, stood on the engine
thread's critical path; a second thread could not take it off (waking it and handing it
the GIL cost as much: benchmarks/RESULTS.md, issue 20). This process does that work beside
the engine, talking through one shared-memory segment:

    header   int64 [POSTED, DONE, NUM_ACCEPT, NUM_FILL, STOP, FAILED,
                    then the process's time so far (ns): waiting for tokens, accepting, filling]
    accepts  int32 slot[cap], int32 row[cap] -> int8 accepted[cap] (written back: 1, or 0 refused,
             -1 refused with no token allowed: core/stop_rules.admits_nothing)
    fills    int32 slot[cap] (-1: all tokens allowed)
    --- page-aligned, one region (page-locked in place by the runner on CUDA) ---
    ids      int64 [cap]: a step's sampled ids, copied there by the device (-1: not yet)
    mask     int32 [cap, width], xgrammar's bitmask layout, row i for fills[i]

A step (`post`): the engine names, per matcher slot, the row of `ids` that holds the token
its sequence sampled, and the slots whose next-token mask it wants, bumps POSTED, then
writes one frame to the process's stdin: the step's control messages (pickled; maybe none).
It posts as soon as it has queued the sampling (the ids are -1 until the device's copy
lands: `sampled_ids()` resets them), so the process works while the engine thread launches
the next forward, waits for the tokens and hands them over. The process, asleep in a read
of its stdin until the frame comes, (1) rolls back the slots the messages name (a failed
step's tokens), (2) waits for each token's row (spinning with sched_yield: the device's
copy lands within a few hundred us), advances the matchers by the tokens, (3) applies the
other messages (new grammars, slots opened and closed), (4) fills the mask rows, then sets
DONE = POSTED. The engine, just before it samples the next step, spins on DONE (`wait`) and
gets the mask rows and what each token did. One step is in flight at a time. The mask is
refilled only after a token of the step it masked has landed (the device read the mask
before it wrote the ids) or, with no token to wait for, when no row of that step goes on.
Big payloads (the tokenizer, a grammar: 0.1-2 MB) go through files in /dev/shm (a pipe
holds 64 KiB).

Order within a step is (2) then (3): a slot's tokens are taken before it is closed (and
maybe reopened for another sequence), and a slot opened in this step has no tokens yet.
The process exits when STOP is set, when its stdin closes (the engine shut it down or is
gone), or when its parent is gone while it waits for a token.

Sleeping between posts rather than spinning (issue 20's seventh pass on an H200: the same
throughput within noise as spinning or napping 50 us, benchmarks/RESULTS.md) burns no core
while no constrained request runs; the post comes ~1 ms before the engine needs the mask.
"""
from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
import weakref
from multiprocessing import shared_memory
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

POSTED, DONE, NUM_ACCEPT, NUM_FILL, STOP, FAILED, NS_TOKENS, NS_ACCEPT, NS_FILL = range(9)
_HEADER = 16
_IDLE_SPIN_S = 0.02
_IDLE_SLEEP_S = 0.0002
WAIT_TIMEOUT_S = 60.0   # the first wait includes the process's start (imports: ~2 s)
_PAYLOAD_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


class GrammarProcessError(RuntimeError):
    """The grammar process failed or exited."""


class _Layout:
    """Named numpy views of the segment (same code on both sides)."""

    def __init__(self, buf: Any, cap: int, width: int) -> None:
        offset = 0

        def take(dtype, shape):
            nonlocal offset
            array = np.ndarray(shape, dtype=dtype, buffer=buf, offset=offset)
            offset += array.nbytes
            offset = -(-offset // 64) * 64
            return array
        self.header = take(np.int64, (_HEADER,))
        self.accept_slot = take(np.int32, (cap,))
        self.accept_row = take(np.int32, (cap,))
        self.accepted = take(np.int8, (cap,))
        self.fill_slot = take(np.int32, (cap,))
        offset = -(-offset // 4096) * 4096   # the device's region on its own pages (page-locked)
        self.region = np.ndarray((_region_bytes(cap, width),), dtype=np.uint8, buffer=buf, offset=offset)
        self.ids = take(np.int64, (cap,))
        self.mask = take(np.int32, (cap, width))

    @staticmethod
    def nbytes(cap: int, width: int) -> int:
        return -(-(_HEADER * 8 + cap * 13 + 5 * 64) // 4096) * 4096 + _region_bytes(cap, width)


def _region_bytes(cap: int, width: int) -> int:
    return -(-cap * 8 // 64) * 64 + cap * width * 4


def region_tensors(layout: _Layout) -> tuple[Any, Any]:
    """(ids, mask) as torch views of one storage (the region): the runner page-locks it once."""
    import torch
    region = torch.from_numpy(layout.region)
    cap, width = layout.mask.shape
    ids_bytes = -(-cap * 8 // 64) * 64
    return region[:cap * 8].view(torch.int64), region[ids_bytes:].view(torch.int32).view(cap, width)


def write_payload(data: bytes) -> str:
    """`data` in a file (in /dev/shm where there is one) that read_payload reads and removes."""
    fd, path = tempfile.mkstemp(prefix="pagedserve-grammar-", dir=_PAYLOAD_DIR)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def read_payload(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


def discard_payload(path: str) -> None:
    """Remove a payload its reader never read (a process stopped before it started)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def module_command(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that run `python -m module args` on this interpreter with this
    package importable (not the working directory's copy)."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe_path, "-m", module, *args], env


class GrammarProcess:
    """The engine's side. Not thread-safe: one engine thread posts and waits. Capacity: `cap`
    accepts and `cap` fill rows per step (the scheduler's max_num_seqs)."""

    def __init__(self, tokenizer_info: Any, cap: int, width: int) -> None:
        self.cap, self.width = cap, width
        self.shm = shared_memory.SharedMemory(create=True, size=_Layout.nbytes(cap, width))
        self.layout = _Layout(self.shm.buf, cap, width)
        self.layout.header[:] = 0
        info_path = write_payload(tokenizer_info.serialize_json().encode())
        argv, env = module_command("pagedserve.core.grammar_process", self.shm.name, str(cap), str(width),
                                   info_path, str(os.getpid()))
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, env=env)
        self._messages: list[tuple] = []
        self._posted = 0
        self.waits, self.wait_seconds = 0, 0.0   # what the engine thread spent in wait()
        self.window_seconds = 0.0   # from each post to its wait: the process's head start
        self._post_time = 0.0
        self._finalizer = weakref.finalize(self, _stop, self.popen, self.shm, self.layout.header, info_path)
        self.ids, self.mask = region_tensors(self.layout)   # share the segment's memory

    # ---- control messages, sent with the next post ------------------------------------
    def add_grammar(self, key: int, compiled: Any) -> None:
        """Make `compiled` (an xgrammar CompiledGrammar) known as `key`."""
        self._messages.append(("grammar", key, write_payload(compiled.serialize_json().encode())))

    def drop_grammar(self, key: int) -> None:
        self._messages.append(("drop", key))

    def open(self, slot: int, key: int) -> None:
        """A fresh matcher of grammar `key` in `slot`."""
        self._messages.append(("open", slot, key))

    def close(self, slot: int) -> None:
        self._messages.append(("close", slot))

    def rollback(self, slot: int) -> None:
        """Undo the last token `slot` accepted (its step failed after the post): applied before
        the next post's tokens."""
        self._messages.append(("rollback", slot))

    # ---- one step -------------------------------------------------------------------------
    def sampled_ids(self) -> Any:
        """The ids row the device copies a step's sampled ids into (int64 tensor [cap], a view of
        the segment), reset to -1 (not landed); the last step is waited for first (it may
        still read them)."""
        if self.layout.header[DONE] != self._posted:
            self.wait()
        self.layout.ids[:] = -1
        return self.ids

    def post(self, accept_slots: list[int], accept_rows: list[int], fill_slots: list[int],
             fills_written: bool = False) -> None:
        """Start a step: advance each slot by the token in its row of `ids` (in order, once it
        has landed), then fill a mask row per fill slot (-1: all allowed). `fills_written`: the
        segment holds these fill slots already (the last post's). A step whose result was
        never taken is waited for first."""
        layout = self.layout
        header = layout.header
        if header[DONE] != self._posted:
            self.wait()
        if len(accept_slots) > self.cap or len(fill_slots) > self.cap:
            raise GrammarProcessError(f"grammar process: more than {self.cap} rows in a step")
        n = len(accept_slots)
        if n:
            layout.accept_slot[:n] = accept_slots
            layout.accept_row[:n] = accept_rows
        if fill_slots and not fills_written:
            layout.fill_slot[:len(fill_slots)] = fill_slots
        header[NUM_ACCEPT] = n
        header[NUM_FILL] = len(fill_slots)
        data = b""
        if self._messages:
            messages, self._messages = self._messages, []
            data = pickle.dumps(messages)
            if len(data) > 32768:   # never fill the pipe (64 KiB): big messages go through a file
                data = pickle.dumps([("file", write_payload(data))])
        self._posted += 1
        self._post_time = time.perf_counter()
        header[POSTED] = self._posted   # before the frame: the process reads the header after it
        try:
            self.popen.stdin.write(len(data).to_bytes(4, "little") + data)
            self.popen.stdin.flush()
        except (BrokenPipeError, ValueError, OSError) as exc:
            raise GrammarProcessError(self._why_dead()) from exc

    def wait(self, timeout: float = WAIT_TIMEOUT_S) -> tuple[Any, Any]:
        """The posted step's result: (mask rows [num fills, width] int32 tensor, a view of the
        segment valid until the next post; accepted [num accepts] int8, 0 where a token broke
        its grammar, -1 where the grammar allowed no token at all). Spins (holding the GIL;
        after ~2 ms it sleeps between looks); raises GrammarProcessError if the process failed
        or is gone."""
        header, posted = self.layout.header, self._posted
        spins = 0
        deadline = None
        start = time.perf_counter()
        while header[DONE] != posted:
            spins += 1
            if spins & 1023 == 0:
                if header[FAILED] or self.popen.poll() is not None:
                    raise GrammarProcessError(self._why_dead())
                now = time.monotonic()
                deadline = deadline or now + timeout
                if now > deadline:
                    raise GrammarProcessError(f"grammar process: no answer in {timeout:.0f} s")
                if spins > 30_000:   # a long wait (the process starting): let other threads run
                    time.sleep(_IDLE_SLEEP_S)
        self.waits += 1
        self.wait_seconds += time.perf_counter() - start
        self.window_seconds += start - self._post_time
        return self.mask[:int(header[NUM_FILL])], self.layout.accepted[:int(header[NUM_ACCEPT])]

    def _why_dead(self) -> str:
        code = self.popen.poll()
        return (f"grammar process (pid {self.popen.pid}) "
                + (f"exited with code {code}" if code is not None else "failed") + " (its stderr has the cause)")

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None and not self.layout.header[FAILED]

    def shutdown(self) -> None:
        """Stop the process (STOP, stdin closed; terminate, kill if it lingers), free the segment."""
        self._finalizer()


def _stop(popen: subprocess.Popen, shm: shared_memory.SharedMemory, header: Any, info_path: str) -> None:
    header[STOP] = 1
    header[POSTED] += 1
    try:
        popen.stdin.close()
    except OSError:
        pass
    try:
        popen.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(timeout=5.0)
    try:
        shm.close()
    except BufferError:   # a tensor view is still alive (the runner's registered mask); unlink anyway
        pass
    try:
        shm.unlink()
    except FileNotFoundError:
        pass
    discard_payload(info_path)


# ---- the process --------------------------------------------------------------------------
def _serve(shm_name: str, cap: int, width: int, info_path: str, parent_pid: int) -> None:
    import torch
    import xgrammar
    shm = shared_memory.SharedMemory(name=shm_name)
    from multiprocessing import resource_tracker   # the engine owns (and unlinks) the segment
    resource_tracker.unregister(shm._name, "shared_memory")
    try:
        _loop(shm, cap, width, info_path, parent_pid, torch, xgrammar)
    finally:
        shm.close()


def _loop(shm, cap: int, width: int, info_path: str, parent_pid: int, torch, xgrammar) -> None:
    from pagedserve.core.stop_rules import admits_nothing
    layout = _Layout(shm.buf, cap, width)
    header = layout.header
    mask = torch.from_numpy(layout.mask)   # xgrammar's fill takes a torch tensor
    info = xgrammar.TokenizerInfo.deserialize_json(read_payload(info_path).decode())
    grammars: dict[int, Any] = {}
    matchers: dict[int, Any] = {}   # slot -> matcher (slots may outnumber a step's rows: preempted ones keep theirs)
    terminated: set[int] = set()    # slots whose matcher took a stop token that ended its grammar
    stop_ids = frozenset(info.stop_token_ids)
    batch = xgrammar.BatchGrammarMatcher(max_threads=1)   # no pool (benchmarks/RESULTS.md, issue 20)
    stdin = sys.stdin.buffer
    try:
        while True:
            messages = _read_frame(stdin)   # asleep until the engine posts
            if messages is None:
                return   # stdin closed: the engine is gone or shut us down
            seen = int(header[POSTED])
            if header[STOP]:
                return
            if messages:
                for message in messages:
                    if message[0] == "rollback" and message[1] in matchers:
                        matchers[message[1]].rollback(1)
                        terminated.discard(message[1])
            n = int(header[NUM_ACCEPT])
            start = time.perf_counter_ns()
            accept_slot, accept_row, accepted, ids = layout.accept_slot, layout.accept_row, layout.accepted, layout.ids
            landing_waits = 0
            results = []
            for slot, row in zip(accept_slot[:n].tolist(), accept_row[:n].tolist()):
                token = int(ids[row])
                if token < 0:   # the device's copy has not landed yet
                    landing = time.perf_counter_ns()
                    if not _await(lambda: ids[row] >= 0, header, parent_pid):
                        return
                    landing_waits += time.perf_counter_ns() - landing
                    token = int(ids[row])
                matcher = matchers.get(slot)
                ok = matcher is not None and matcher.accept_token(token)
                if ok and token in stop_ids and matcher.is_terminated():
                    terminated.add(slot)
                results.append(1 if ok else -1 if admits_nothing(matcher, info.vocab_size) else 0)
            if n:
                accepted[:n] = results
            accepted_at = time.perf_counter_ns()
            if messages:
                _apply(messages, grammars, matchers, terminated, info, xgrammar)
            fill_matchers, indices = [], []
            for row, slot in enumerate(layout.fill_slot[:int(header[NUM_FILL])].tolist()):
                matcher = matchers.get(slot)
                if matcher is None or slot in terminated:   # (xgrammar refuses to fill a terminated one)
                    mask[row].fill_(-1)
                else:
                    fill_matchers.append(matcher)
                    indices.append(row)
            if fill_matchers:
                batch.batch_fill_next_token_bitmask(fill_matchers, mask, indices)
            done = time.perf_counter_ns()
            header[NS_TOKENS] += landing_waits
            header[NS_ACCEPT] += accepted_at - start - landing_waits
            header[NS_FILL] += done - accepted_at
            header[DONE] = seen
    except BaseException:
        header[FAILED] = 1
        raise


def _await(ready, header: Any, parent_pid: int) -> bool:
    """Spin until ready() (sched_yield between looks; sleeps after 20 ms); False if the parent
    is gone or the engine set STOP."""
    start = time.monotonic()
    spins, idle = 0, False
    while not ready():
        spins += 1
        if spins & 1023 == 0:
            if os.getppid() != parent_pid or header[STOP]:
                return False
            idle = time.monotonic() - start > _IDLE_SPIN_S
        if idle:
            time.sleep(_IDLE_SLEEP_S)
        else:
            os.sched_yield()
    return True


def _read_frame(stdin: Any) -> list[tuple] | None:
    """One frame of control messages from the engine (blocking); None at end of file."""
    head = stdin.read(4)
    if len(head) < 4:
        return None
    size = int.from_bytes(head, "little")
    return _unpack(pickle.loads(stdin.read(size))) if size else []


def _unpack(messages: list[tuple]) -> list[tuple]:
    """The messages, those sent through a file read in."""
    out = []
    for message in messages:
        out += _unpack(pickle.loads(read_payload(message[1]))) if message[0] == "file" else [message]
    return out


def _apply(messages: list[tuple], grammars: dict[int, Any], matchers: dict[int, Any], terminated: set[int],
           info: Any, xgrammar) -> None:
    """The control messages after the step's tokens (rollbacks came before them)."""
    for message in messages:
        kind = message[0]
        if kind in ("open", "close"):
            terminated.discard(message[1])
        if kind == "grammar":
            grammars[message[1]] = xgrammar.CompiledGrammar.deserialize_json(read_payload(message[2]).decode(), info)
        elif kind == "drop":
            grammars.pop(message[1], None)
        elif kind == "open":
            matchers[message[1]] = xgrammar.GrammarMatcher(grammars[message[2]])
        elif kind == "close":
            matchers.pop(message[1], None)


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
