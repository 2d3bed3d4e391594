"""Hand the C heap's free pages back to the OS (glibc's malloc_trim).

glibc keeps what a process frees inside its heaps: the temporaries of start-up (weights read
and repacked, the tokenizer built on a thread, the modules' import-time garbage) and of a
burst of requests (one malloc arena per thread that allocated) stay resident after their
objects are gone. malloc_trim(0) returns every whole free page of every arena (madvise
DONTNEED), so the process's RSS is what it holds, not what it once held: measured on the
default model, 30 MiB after start-up and ~15 MiB after a burst of 16 streams
(benchmarks/serve_memory.py, benchmarks/RESULTS.md issue 19). Elsewhere (macOS, musl) it
does nothing.

The call takes ~1 ms for this server's heap and locks each arena while it walks it, so
it runs once start-up is done and when the engine has been idle for a while, never on a
step's path.
"""
from __future__ import annotations

import ctypes
import functools
import logging
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


def release_free_heap() -> bool:
    """malloc_trim(0) where the C library has it (the GIL is released meanwhile); whether it ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
