"""Hand the C heap's free pages back to the OS (glibc's malloc_trim).

glibc keeps what a process frees inside its heaps: the temporaries of start-up (weights read
and repacked, the tokenizer built on a thread, the modules' import-time garbage) and of a
burst of requests (one malloc arena per thread that allocated) stay resident after their
objects are gone. malloc_trim(0) returns every whole free page of every arena (madvise
DONTNEED), so the process's RSS is what it holds, not what it once held. MKL (torch's BLAS
for the prefill GEMMs of more than 64 rows on the CPU) keeps its packing buffers for reuse
too: mkl_free_buffers hands them to free() first. Measured on the default model: 30 MiB
less after start-up, ~35 MiB less after a burst of 16 streams (benchmarks/serve_memory.py,
benchmarks/RESULTS.md issue 19). Elsewhere (macOS, musl) it does nothing.

limit_arenas(1) (mallopt M_ARENA_MAX, before the threads start): `serve` with the engine core
on its thread (the CPU default) shares one arena between its threads: 5-7 MiB less after a
burst, no slower in the same measurements (MALLOC_ARENA_MAX in the environment wins).

The trim takes ~1 ms for this server's heap and locks each arena while it walks it, so
it runs once start-up is done and when the engine has been idle for a while, never on a
step's path.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from typing import Callable

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim   # the C library the interpreter runs on
    except (OSError, AttributeError):   # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


M_ARENA_MAX = -8   # glibc's malloc.h


def limit_arenas(count: int) -> bool:
    """mallopt(M_ARENA_MAX, count): threads created later share `count` malloc arenas instead
    of one each (up to 8 per core), so what one thread frees another reuses, and fewer
    half-empty heaps stay resident. Call before the threads start; whether it took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_ARENA_MAX, count) == 1


@functools.cache
def _mkl_free_buffers() -> Callable[[], None] | None:
    """MKL's mkl_free_buffers (exported by torch's libtorch_cpu as mkl_serv_free_buffers), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import torch
        if not torch.backends.mkl.is_available():
            return None
        free = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")).mkl_serv_free_buffers
    except (OSError, AttributeError):   # another build of torch: nothing to free
        return None
    free.argtypes = []
    free.restype = None
    return free


def release_free_heap() -> bool:
    """Free MKL's cached GEMM buffers (where torch links MKL), then malloc_trim(0) where the C
    library has it (the GIL is released meanwhile); whether the trim ran. Only while no torch
    op runs on another thread (serve: once started, and from the idle engine thread)."""
    free_mkl = _mkl_free_buffers()
    if free_mkl is not None:
        free_mkl()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
