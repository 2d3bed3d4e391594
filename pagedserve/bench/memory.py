"""KV memory report: the blocks paged allocation used against a contiguous cache
preallocated at max_model_len for the same requests, plus what was measured per step.

For N requests of final lengths L_i (prompt + output), block size B, and L_max = max_model_len:

    paged      = sum_i ceil(L_i / B) * B        token slots if all N were resident at once
    contiguous = N * L_max                      one max_model_len slab per request
    used       = sum_i L_i
    waste %    = 100 * (slots - used) / slots   for each of the two

Measured (KVUsageProbe): after each schedule(), before the step frees anything, the blocks
held by live requests and the number of running requests; their maxima are the peak blocks
in use and the measured maximum concurrency.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence


@dataclass
class KVSample:
    time_s: float          # since the probe was installed
    blocks_in_use: int
    num_running: int
    num_waiting: int


@dataclass
class KVUsageProbe:
    """Wraps one Scheduler's schedule() to sample the pool after each call. Install before
    the run, remove after; samples are appended from the engine thread only."""

    scheduler: Any
    samples: list[KVSample] = field(default_factory=list)
    _original: Callable | None = None
    _t0: float = 0.0

    def install(self) -> "KVUsageProbe":
        self._original = self.scheduler.schedule
        self._t0 = time.perf_counter()
        pool = self.scheduler.kv.pool

        def schedule() -> Any:
            out = self._original()
            self.samples.append(KVSample(time.perf_counter() - self._t0, pool.num_blocks - pool.num_free_blocks,
                                         len(self.scheduler.running), len(self.scheduler.waiting)))
            return out

        self.scheduler.schedule = schedule
        return self

    def remove(self) -> None:
        if self._original is not None:
            del self.scheduler.schedule   # back to the class method
            self._original = None

    @property
    def peak_blocks_in_use(self) -> int:
        return max((s.blocks_in_use for s in self.samples), default=0)

    @property
    def max_concurrency(self) -> int:
        return max((s.num_running for s in self.samples), default=0)


@dataclass
class KVMemoryReport:
    num_requests: int
    block_size: int
    max_model_len: int
    num_kv_blocks: int
    used_tokens: int
    paged_tokens: int
    contiguous_tokens: int
    paged_waste_pct: float
    contiguous_waste_pct: float
    contiguous_over_paged: float       # how many times more slots the contiguous cache needs
    peak_blocks_in_use: int
    peak_kv_usage_pct: float
    measured_max_concurrency: int
    contiguous_max_concurrency: int    # max_model_len slabs that fit in the same pool
    num_steps: int

    def to_dict(self) -> dict:
        return asdict(self)


def paged_slots(lengths: Sequence[int], block_size: int) -> int:
    return sum(-(-length // block_size) * block_size for length in lengths)


def kv_memory_report(lengths: Sequence[int], block_size: int, max_model_len: int, num_kv_blocks: int,
                     samples: Sequence[KVSample] = ()) -> KVMemoryReport:
    """`lengths`: each request's final length (prompt + output tokens)."""
    used = sum(lengths)
    paged = paged_slots(lengths, block_size)
    contiguous = len(lengths) * max_model_len
    peak = max((s.blocks_in_use for s in samples), default=0)
    return KVMemoryReport(
        num_requests=len(lengths), block_size=block_size, max_model_len=max_model_len, num_kv_blocks=num_kv_blocks,
        used_tokens=used, paged_tokens=paged, contiguous_tokens=contiguous,
        paged_waste_pct=_waste(paged, used), contiguous_waste_pct=_waste(contiguous, used),
        contiguous_over_paged=contiguous / paged if paged else 0.0,
        peak_blocks_in_use=peak, peak_kv_usage_pct=100.0 * peak / num_kv_blocks if num_kv_blocks else 0.0,
        measured_max_concurrency=max((s.num_running for s in samples), default=0),
        contiguous_max_concurrency=num_kv_blocks * block_size // max_model_len if max_model_len else 0,
        num_steps=len(samples))


def _waste(slots: int, used: int) -> float:
    return 100.0 * (slots - used) / slots if slots else 0.0


def format_kv_report(r: KVMemoryReport) -> str:
    return "\n".join([
        f"KV memory ({r.num_requests} requests, block size {r.block_size}, max_model_len {r.max_model_len}):",
        f"  tokens stored (sum L_i):              {r.used_tokens:>12,}",
        f"  paged slots (sum ceil(L_i/B)*B):      {r.paged_tokens:>12,}  waste {r.paged_waste_pct:5.1f}%",
        f"  contiguous slots (N * max_model_len): {r.contiguous_tokens:>12,}  waste {r.contiguous_waste_pct:5.1f}%",
        f"  contiguous / paged:                   {r.contiguous_over_paged:>12.2f}x",
        f"  peak blocks in use:                   {r.peak_blocks_in_use:>12,} of {r.num_kv_blocks:,} "
        f"({r.peak_kv_usage_pct:.1f}%)",
        f"  measured max concurrency:             {r.measured_max_concurrency:>12}  "
        f"(a contiguous cache of the same size holds {r.contiguous_max_concurrency})",
    ])
