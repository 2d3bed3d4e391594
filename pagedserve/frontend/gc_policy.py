"""The cyclic garbage collector's youngest generation on the engine's hot loop.

CPython collects generation 0 whenever the tracked objects allocated since the last collection
outnumber the deallocated ones by its threshold (700). A decode step of 512 rows makes and drops
thousands of small tracked objects (scheduler and runner records, outputs, token lists), so the
count passes 700 inside nearly every step: ~1-2 collections a step, each walking the step's live
young objects, though reference counting frees them all at the step's end (llama-1b thr512 on an
H200: 483 gen-0 and 44 gen-1 collections a run, 50-80 ms of a host-bound run; benchmarks/RESULTS.md,
session 29). At HOT_GEN0_THRESHOLD a collection comes only once that many survive (reference
cycles), so what it bounds, the uncollected cyclic garbage, stays small (~50k objects).

`hot_loop_collector()` raises the threshold around LLM.generate (adding its requests, then its
loop) and restores it after (the application's process); the engine-core process and the server,
whose process is ours, keep it raised (`raise_gen0_threshold()`). A threshold the application set higher, or a
disabled collector, is left as it is.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator

HOT_GEN0_THRESHOLD = 50_000


def raise_gen0_threshold() -> tuple[int, ...] | None:
    """Generation 0's threshold to at least HOT_GEN0_THRESHOLD; the thresholds before, or None
    where nothing changed (already that high, or 0: the collector off by threshold)."""
    before = gc.get_threshold()
    if before[0] == 0 or before[0] >= HOT_GEN0_THRESHOLD:
        return None
    gc.set_threshold(HOT_GEN0_THRESHOLD, *before[1:])
    return before


@contextmanager
def hot_loop_collector() -> Iterator[None]:
    """Inside, raise_gen0_threshold(); after, the thresholds as they were (unless something
    inside set its own)."""
    before = raise_gen0_threshold()
    try:
        yield
    finally:
        if before is not None and gc.get_threshold()[0] == HOT_GEN0_THRESHOLD:
            gc.set_threshold(*before)
