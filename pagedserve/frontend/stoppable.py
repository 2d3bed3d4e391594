"""Request work on a pool thread, awaited: `in_pool` (a StopIteration raised there reaches the
coroutine as a RuntimeError, where asyncio would never have resolved the await), and
`run_stoppable`, whose function stops when the coroutine awaiting it is cancelled (its client
left): it gets a threading.Event that is set then, and looks at it (`until_stopped` over its
items) or hands it on (a grammar compile kills its child process: grammar_compile.py)."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Executor
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


class Stopped(Exception):
    """until_stopped's: the request was cancelled mid-way (nobody reads this)."""


def until_stopped(items: Iterable[T], stop: threading.Event | None) -> Iterator[T]:
    """`items`, raising Stopped before the next one once `stop` is set."""
    for item in items:
        if stop is not None and stop.is_set():
            raise Stopped()
        yield item


def surfacing(function: Callable[..., T], *args: Any) -> T:
    """function(*args), a StopIteration it raises turned into a RuntimeError: a pool's future
    cannot hand a StopIteration to asyncio (its callback fails), so the coroutine awaiting it
    would wait for ever."""
    try:
        return function(*args)
    except StopIteration as exc:
        raise RuntimeError(f"{getattr(function, '__qualname__', function)!s} raised StopIteration") from exc


async def in_pool(executor: Executor | None, function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` on `executor` (None: the loop's default pool), awaited (surfacing)."""
    return await asyncio.get_running_loop().run_in_executor(executor, surfacing, function, *args)


async def run_stoppable(executor: Executor, function: Callable[..., T], *args: Any) -> T:
    """`function(*args, stop)` on `executor`; if this is cancelled, `stop` is set."""
    stop = threading.Event()
    try:
        return await in_pool(executor, function, *args, stop)
    except asyncio.CancelledError:
        stop.set()
        raise
