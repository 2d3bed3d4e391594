"""Where a served engine's time goes, kept always (a few perf_counter reads per step) and
summarised on demand (the server's GET /debug/steps, benchmarks/serve_gpu.py).

Per engine step: when the core's step began and ended (in the engine-core process when the
core runs there: perf_counter is CLOCK_MONOTONIC, one clock for every process of the machine),
the tokens it scheduled, the requests running, and when the frontend had turned its outputs into RequestOutputs (detokenizing, stop
strings) and handed them to the event loop. From those:

- step_ms: the core's step (schedule, launch, wait for the previous step, update), split into
  decode-only steps and mixed ones (a prefill chunk in the batch), and the decode-only steps
  right after a mixed one (under async scheduling a call launches step k+1 and waits for step
  k: its time is k+1's launch plus the rest of k's device time, its tokens k+1's);
- gap_ms: from one step's end to the next one's start while there was work: the time the
  core's driver spent elsewhere (output processing, commands, waiting for the GIL);
- deliver_ms: from a core step's end until its outputs were handed to the event loop (in
  process: the output processing, part of the gap; engine process: plus the pipe and the
  wait for the server's engine thread);
- the GIL probe (`probe_gil=True`): a thread that sleeps PROBE_SLEEP_S in a loop; how late it
  wakes is how long a thread that became runnable waited to run (the GIL, or the OS on a busy
  machine); it adds 200 GIL hand-overs a second of its own;
- cpu: each named thread's CPU time over the wall time (time.thread_time, sampled by the
  threads themselves), e.g. the event loop's and the engine thread's busy fractions.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

MAX_STEPS = 200_000   # ~a few MB; the oldest are dropped
PROBE_SLEEP_S = 0.005


@dataclass(frozen=True, slots=True)
class StepTime:
    begin: float          # the core's step, perf_counter seconds
    end: float
    num_tokens: int       # tokens scheduled
    num_running: int
    deliver_s: float      # from `end` until the step's outputs were handed to the event loop


class StepTimer:
    """Appended to by the engine's driver thread only; summary() and reset() from any thread
    (a deque's append and a snapshot copy are atomic enough for statistics)."""

    def __init__(self, probe_gil: bool = False) -> None:
        self.steps: deque[StepTime] = deque(maxlen=MAX_STEPS)
        self.gil_waits: deque[float] = deque(maxlen=MAX_STEPS)
        self._cpu: dict[str, tuple[float, float, float, float]] = {}   # name -> (wall0, cpu0, wall, cpu)
        self.since = time.perf_counter()
        self._probe: threading.Thread | None = None
        self._stop = threading.Event()
        if probe_gil:
            self._probe = threading.Thread(target=self._probe_gil, name="pagedserve-gil-probe", daemon=True)
            self._probe.start()

    def record(self, step: StepTime) -> None:
        self.steps.append(step)

    def sample_cpu(self, name: str, wall: float | None = None, cpu: float | None = None) -> None:
        """Called by the thread `name` itself, now and then: its CPU time so far (or `cpu`,
        a thread's CPU time read elsewhere at perf_counter `wall`)."""
        if wall is None or cpu is None:
            wall, cpu = time.perf_counter(), time.thread_time()
        first = self._cpu.get(name)
        self._cpu[name] = (first[0], first[1], wall, cpu) if first else (wall, cpu, wall, cpu)

    def reset(self) -> None:
        self.steps.clear()
        self.gil_waits.clear()
        self._cpu.clear()
        self.since = time.perf_counter()

    def close(self) -> None:
        self._stop.set()

    def _probe_gil(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(PROBE_SLEEP_S)
            self.gil_waits.append(time.perf_counter() - t0 - PROBE_SLEEP_S)

    def raw(self, last: int = 5000) -> list[tuple[float, float, int, int, float]]:
        """The last `last` steps as (begin, end, tokens, running, deliver_s) tuples."""
        return [(s.begin, s.end, s.num_tokens, s.num_running, s.deliver_s) for s in list(self.steps)[-last:]]

    def summary(self) -> dict[str, Any]:
        steps = list(self.steps)
        out: dict[str, Any] = {"window_s": round(time.perf_counter() - self.since, 3), "steps": len(steps)}
        if steps:
            busy = steps[-1].end - steps[0].begin
            decode = [s for s in steps if s.num_tokens <= s.num_running]
            mixed = [s for s in steps if s.num_tokens > s.num_running]
            after_mixed = [b for a, b in zip(steps, steps[1:])
                           if a.num_tokens > a.num_running and b.num_tokens <= b.num_running]
            gaps = [b.begin - a.end for a, b in zip(steps, steps[1:]) if b.begin - a.end < 0.5]   # not idle
            out.update(
                steps_per_s=round(len(steps) / busy, 1) if busy > 0 else None,
                mean_running=round(sum(s.num_running for s in steps) / len(steps), 2),
                mean_tokens=round(sum(s.num_tokens for s in steps) / len(steps), 1),
                decode_steps=len(decode), mixed_steps=len(mixed),
                step_ms=_dist([s.end - s.begin for s in steps]),
                decode_step_ms=_dist([s.end - s.begin for s in decode]),
                mixed_step_ms=_dist([s.end - s.begin for s in mixed]),
                decode_after_mixed_ms=_dist([s.end - s.begin for s in after_mixed]),
                gap_ms=_dist(gaps),
                deliver_ms=_dist([s.deliver_s for s in steps]))
        waits = list(self.gil_waits)
        if waits:
            out["gil_probe_wait_ms"] = _dist(waits)
        out["cpu_busy"] = {name: round((cpu - cpu0) / (wall - wall0), 3)
                           for name, (wall0, cpu0, wall, cpu) in list(self._cpu.items()) if wall > wall0}
        return out


def _dist(values: list[float]) -> dict[str, float] | None:
    """Mean / P50 / P90 / P99 / max, in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]   # noqa: E731
    return {"mean": round(1e3 * sum(ordered) / len(ordered), 3), "p50": round(1e3 * pick(0.5), 3),
            "p90": round(1e3 * pick(0.9), 3), "p99": round(1e3 * pick(0.99), 3), "max": round(1e3 * ordered[-1], 3)}
