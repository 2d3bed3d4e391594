"""Triton kernels compiled before start-up needs them, in parallel.

Without this, a cold Triton cache compiles each kernel specialisation (constexpr combination,
dtype, the divisibility of its pointers and ints) at its first launch, one after the other:
the profile forward and the CUDA graph warm-ups of an 8B model spent ~13 s of a cold start
compiling on an H200 (2026-11-30, benchmarks/gpu/2026-11-30-h200-serve). `compile_ahead(dry_run)`
runs `dry_run` (the forwards about to be run) with every uncompiled Triton launch recorded and
skipped (Triton's jit_cache_hook; torch's own ops still run, on whatever the skipped kernels
left in their outputs: a dry run must not keep any result), compiling each recorded one on a
thread pool from the moment it is recorded (Triton's AsyncCompileMode + JITFunction.preload,
the specialisation the launch would have compiled, keyed the same), builds each kernel's C
launcher on its thread as soon as the kernel is compiled, and loads every kernel into the CUDA
context (so a launch in a CUDA graph capture loads nothing: capture needs no warm-up per size).
Triton's LLVM code generation and the ptxas / gcc child processes run outside the GIL.
The real launches that follow find the kernels compiled; with a warm cache the threads only
load them. Any failure here is logged and left to the real launch, which compiles as before.
On the H200 (benchmarks/RESULTS.md, 2026-12-01): 22 specialisations, cold ready 8.05 s
instead of 13.03 s (the graphs' 16 in 1.3 s on 16 threads, 5.8 s on one).
"""
from __future__ import annotations

import logging
import os
import threading
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
def recording(on_record: Callable[[Launch], None] | None = None) -> Iterator[list[Launch]]:
    """Inside, a Triton launch whose specialisation is not compiled in this process is
    appended (once per kernel and key: a _Recorded stand-in takes the key until the end) to
    the yielded list instead of compiled and launched, and handed to `on_record` (which may
    start its compile: Compiler.submit)."""
    from triton import knobs
    launches: list[Launch] = []
    placed: list[tuple[dict, Any]] = []
    submitting = [False]

    def hook(*, key: Any, fn: Any, compile: dict, **_: Any) -> bool:
        if submitting[0]:
            return False   # on_record's own preload: let it compile
        launch = Launch(fn.jit_function, compile["specialization_data"])
        launches.append(launch)
        cache = fn.jit_function.device_caches[compile["device"]][0]
        cache[key] = _RECORDED
        placed.append((cache, key))
        if on_record is not None:
            submitting[0] = True
            try:
                on_record(launch)
            finally:
                submitting[0] = False
                cache[key] = _RECORDED   # newer Triton puts its compile's future there: no launch may wait on it
        return True   # skip the compile and the launch

    previous, knobs.runtime.jit_cache_hook = knobs.runtime.jit_cache_hook, hook
    try:
        yield launches
    finally:
        knobs.runtime.jit_cache_hook = previous
        for cache, key in placed:
            if cache.get(key) is _RECORDED:
                del cache[key]


# (kernel and specialisation, seconds) of each Triton compile after start-up in this process
# (watch_late_compiles); benchmarks/thr_spread.py reports them
LATE_COMPILES: list[tuple[str, float]] = []
LATE_COMPILE_WARN_S = 0.1   # shorter: a load from Triton's disk cache, logged at DEBUG only


def describe_specialisation(name: str, compile: dict) -> str:
    """`kernel(arg: type [%16 where Triton assumes divisibility by 16], constexpr=value, ...)
    [warps, stages]` from a Triton hook's compile data: what tells two specialisations apart."""
    constants, attrs = compile.get("constants", {}), (compile.get("configs") or [{}])[0]
    args = []
    for i, (arg, kind) in enumerate(compile.get("signature", {}).items()):
        if kind == "constexpr":
            args.append(f"{arg}={constants.get((i,), '?')}")
        else:
            divisible = any(attr[0] == "tt.divisibility" for attr in attrs.get((i,), ()))
            args.append(f"{arg}: {kind}{' %16' if divisible else ''}")
    return f"{name}({', '.join(args)}) [warps {compile.get('num_warps')}, stages {compile.get('num_stages')}]"


def watch_late_compiles() -> bool:
    """From now on, log each Triton specialisation this process compiles (or loads from the
    disk cache) at a real launch: after start-up the step that launches it waits for the
    compile, ~0.5-2 s on a cold cache, so one the dry runs did not take is a start-up gap (a
    WARNING from LATE_COMPILE_WARN_S on, naming the kernel and its argument specialisation).
    Only this thread's launches count: the host KV tier's pinning thread compiles its copy
    kernel off the steps.
    Chains whatever cache hook is set (recording() sets its own and puts this one back). Not
    under TP or PP, whose kernels compile at first launch by design (compile_ahead). True when
    installed (once a process)."""
    from triton import knobs
    if tp_world_size() * pp_world_size() > 1 or getattr(knobs.runtime.jit_cache_hook, "late_watch", False):
        return False
    previous_cache, previous_post = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
    started: dict[Any, float] = {}
    engine_thread = threading.get_ident()   # another thread's compile (the host tier's check) holds no step

    def cache_hook(**kwargs: Any) -> bool:
        if previous_cache is not None and previous_cache(**kwargs):
            return True
        if not kwargs["is_manual_warmup"] and threading.get_ident() == engine_thread:
            started[kwargs["key"]] = time.perf_counter()
        return False

    def post_hook(**kwargs: Any) -> Any:
        begun = started.pop(kwargs["key"], None)
        if begun is not None:
            seconds = time.perf_counter() - begun
            name = describe_specialisation(kwargs["fn"].name, kwargs["compile"])
            LATE_COMPILES.append((name, seconds))
            logger.log(logging.WARNING if seconds >= LATE_COMPILE_WARN_S else logging.DEBUG,
                       "Triton compiled %s at its first launch after start-up in %.2f s (the step waited; "
                       "the start-up dry runs did not take this specialisation)", name, seconds)
        return previous_post(**kwargs) if previous_post is not None else None

    cache_hook.late_watch = True
    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = cache_hook, post_hook
    return True


def _build_launcher(kernel: Any) -> None:
    """The compiled kernel's C launcher (a gcc run on a cold cache, cached on disk)."""
    from triton.runtime.driver import driver
    driver.active.launcher_cls(kernel.src, kernel.metadata)


def _launcher_after(future: Any) -> None:
    """A compile's done-callback (on its thread): the kernel's launcher, built as soon as the
    kernel is, rather than after the round's slowest compile."""
    if future.exception() is None:
        try:
            _build_launcher(future.result())
        except Exception as exc:   # noqa: BLE001 - the launch builds it again (and reports it)
            logger.debug("cannot build a Triton launcher ahead: %s", exc)


class Compiler:
    """Inside, `submit(launch)` starts compiling a recorded specialisation on one of `workers`
    threads (Triton's AsyncCompileMode + JITFunction.preload: the specialisation the launch
    would have compiled, keyed the same), its launcher built on that thread once it is
    compiled. The exit waits for them all and puts each kernel in its JITFunction's cache;
    `load()` then loads them into the CUDA context (this thread's) and says how many failed."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.futures: list[Any] = []
        self.failed = 0

    def __enter__(self) -> "Compiler":
        from triton.runtime._async_compile import AsyncCompileMode
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="triton-compile")
        self.mode = AsyncCompileMode(self.pool, ignore_errors=True)   # a failed compile is left to the launch
        self.mode.__enter__()
        return self

    def submit(self, launch: Launch) -> None:
        try:
            future = launch.kernel.preload(launch.data)
        except Exception as exc:   # noqa: BLE001 - left to the launch
            self.failed += 1
            logger.debug("cannot compile %s ahead: %s", launch.kernel, exc)
            return
        self.futures.append(future)
        raw = getattr(future, "future", None)   # Triton's FutureKernel around the pool's future
        if raw is not None and getattr(future, "kernel", None) is None:
            raw.add_done_callback(_launcher_after)

    def __exit__(self, *exc: Any) -> None:
        try:
            self.mode.__exit__(*exc)   # every compile finished and finalized
        finally:
            self.pool.shutdown(wait=True)   # and every launcher built

    def load(self) -> int:
        for future in self.futures:
            # a FutureKernel (AsyncCompileMode), or the kernel itself should a Triton return one
            kernel = future.result(ignore_errors=True) if hasattr(future, "result") else future
            try:
                kernel._init_handles()
            except Exception as exc:   # noqa: BLE001 - None (failed compile) or a load error: the launch's
                self.failed += 1
                logger.debug("cannot load a Triton kernel ahead: %s", exc)
        return self.failed


def compile_all(launches: list[Launch], workers: int) -> int:
    """Compile and load every recorded specialisation (Compiler); how many failed."""
    with Compiler(workers) as compiler:
        for launch in launches:
            compiler.submit(launch)
    return compiler.load()


def compile_ahead(dry_run: Callable[[], object], workers: int | None = None) -> bool:
    """Record the Triton launches of `dry_run()` (CUDA tensors), each compiled on a thread
    from the moment it is recorded (the compiles overlap the rest of the dry run), and load
    them (see the module docstring). A no-op with 0 workers and under TP or PP: skipping a
    launch there could desynchronise the ranks' collectives. Never raises for a compile (the
    real launch retries it) unless STRICT. True when the dry run ran and every kernel it
    launches is compiled and loaded."""
    workers = WORKERS if workers is None else workers
    if workers <= 0 or tp_world_size() * pp_world_size() > 1:
        return False
    start = time.perf_counter()
    try:
        with Compiler(workers) as compiler:
            with recording(compiler.submit) as launches:
                dry_run()
            recorded = time.perf_counter()
        failed = compiler.load()
    except Exception as exc:   # noqa: BLE001 - the real launch compiles (and reports) it again
        if STRICT:
            raise
        logger.warning("compiling Triton kernels ahead failed (%s: %s); they compile at first launch",
                       type(exc).__name__, exc)
        return False
    if launches:
        logger.info("compiled %d Triton kernel specialisations ahead on %d threads: dry run %.2f s, then %.1f s%s",
                    len(launches), workers, recorded - start, time.perf_counter() - recorded,
                    f"; {failed} left to their first launch" if failed else "")
    if failed and STRICT:
        raise RuntimeError(f"{failed} Triton kernels not compiled ahead")
    return not failed
