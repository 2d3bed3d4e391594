"""Triton kernels compiled before start-up needs them, in parallel.

Without this, a cold Triton cache compiles each kernel specialisation (constexpr combination,
dtype, the divisibility of its pointers and ints) at its first launch, one after the other:
the profile forward and the CUDA graph warm-ups of an 8B model spent ~13 s of a cold start
compiling on an H200 (2026-11-30, benchmarks/gpu/2026-11-30-h200-serve). `compile_ahead(dry_run)`
runs `dry_run` (the forwards about to be run) with every uncompiled Triton launch recorded and
skipped (Triton's jit_cache_hook; torch's own ops still run, on whatever the skipped kernels
left in their outputs: a dry run must not keep any result), then compiles what it recorded
on a thread pool (Triton's AsyncCompileMode + JITFunction.preload, the specialisation the
launch would have compiled, keyed the same), and builds each kernel's C launcher there too.
Triton's LLVM code generation and the ptxas / gcc child processes run outside the GIL.
The real launches that follow find the kernels compiled; with a warm cache the threads only
load them. Any failure here is logged and left to the real launch, which compiles as before.
On the H200 (benchmarks/RESULTS.md, 2026-12-01): 22 specialisations, cold ready 8.05 s
instead of 13.03 s (the graphs' 16 in 1.3 s on 16 threads, 5.8 s on one).
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from pagedserve.layers.parallel import pp_world_size, tp_world_size

logger = logging.getLogger(__name__)

# threads compiling at once; 0 turns compile-ahead off (benchmarks/startup_gpu.py compares)
WORKERS = min(16, os.cpu_count() or 1)
# PAGEDSERVE_COMPILE_AHEAD_STRICT=1 (the GPU benchmark scripts set it): a failed compile-ahead
# raises instead of leaving the kernels to compile at first launch, so a broken dry run cannot
# pass unnoticed in a measurement (it once did: session 6's `_run_only` lambda).
STRICT = os.environ.get("PAGEDSERVE_COMPILE_AHEAD_STRICT") == "1"


@dataclass(frozen=True)
class Launch:
    """One recorded specialisation: the JITFunction and its serialized specialisation data."""
    kernel: Any
    data: str


class _Recorded:
    """Stands in a JITFunction's kernel cache for a specialisation recorded in a dry run: its
    later launches find it and launch nothing, without the hook's per-launch serialisation
    (~70 us a launch, ~10k launches in the graph sizes' dry run)."""
    function = packed_metadata = None

    @staticmethod
    def launch_metadata(*_: Any) -> None:
        return None

    @staticmethod
    def run(*_: Any) -> None:
        return None


_RECORDED = _Recorded()


@contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside, a Triton launch whose specialisation is not compiled in this process is
    appended (once per kernel and key: a _Recorded stand-in takes the key until the end) to
    the yielded list instead of compiled and launched."""
    from triton import knobs
    launches: list[Launch] = []
    placed: list[tuple[dict, Any]] = []

    def hook(*, key: Any, fn: Any, compile: dict, **_: Any) -> bool:
        launches.append(Launch(fn.jit_function, compile["specialization_data"]))
        cache = fn.jit_function.device_caches[compile["device"]][0]
        cache[key] = _RECORDED
        placed.append((cache, key))
        return True   # skip the compile and the launch

    previous, knobs.runtime.jit_cache_hook = knobs.runtime.jit_cache_hook, hook
    try:
        yield launches
    finally:
        knobs.runtime.jit_cache_hook = previous
        for cache, key in placed:
            if cache.get(key) is _RECORDED:
                del cache[key]


def _build_launcher(kernel: Any) -> None:
    """The compiled kernel's C launcher (a gcc run on a cold cache, cached on disk)."""
    from triton.runtime.driver import driver
    driver.active.launcher_cls(kernel.src, kernel.metadata)


def compile_all(launches: list[Launch], workers: int) -> None:
    """Compile every recorded specialisation on `workers` threads into its JITFunction's
    cache (AsyncCompileMode waits for them all on exit)."""
    from triton.runtime._async_compile import AsyncCompileMode
    futures = []
    with ThreadPoolExecutor(workers, thread_name_prefix="triton-compile") as pool:
        with AsyncCompileMode(pool, ignore_errors=True):   # a failed compile is left to the launch
            for launch in launches:
                try:
                    futures.append(launch.kernel.preload(launch.data))
                except Exception as exc:   # noqa: BLE001 - left to the launch
                    logger.debug("cannot compile %s ahead: %s", launch.kernel, exc)
        kernels = [f.result(ignore_errors=True) for f in futures if f is not None]
        for done in [pool.submit(_build_launcher, k) for k in kernels if k is not None]:
            if done.exception() is not None:
                logger.debug("cannot build a Triton launcher ahead: %s", done.exception())


def compile_ahead(dry_run: Callable[[], object], workers: int | None = None) -> None:
    """Record the Triton launches of `dry_run()` (CUDA tensors) and compile them in parallel
    (see the module docstring). A no-op with 0 workers and under TP or PP: skipping a launch
    there could desynchronise the ranks' collectives. Never raises for a compile (the real
    launch retries it) unless STRICT."""
    workers = WORKERS if workers is None else workers
    if workers <= 0 or tp_world_size() * pp_world_size() > 1:
        return
    start = time.perf_counter()
    try:
        with recording() as launches:
            dry_run()
        recorded = time.perf_counter()
        if launches:
            compile_all(launches, workers)
    except Exception as exc:   # noqa: BLE001 - the real launch compiles (and reports) it again
        if STRICT:
            raise
        logger.warning("compiling Triton kernels ahead failed (%s: %s); they compile at first launch",
                       type(exc).__name__, exc)
        return
    if launches:
        logger.info("compiled %d Triton kernel specialisations ahead on %d threads in %.1f s (dry run %.2f s)",
                    len(launches), workers, time.perf_counter() - recorded, recorded - start)
