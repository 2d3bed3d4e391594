"""frontend/stoppable.py: work handed to a pool and awaited. A StopIteration raised there reaches
the awaiting coroutine as a RuntimeError (asyncio cannot take a StopIteration from a pool's future:
the request waited for ever); cancelling the awaiting coroutine sets the function's stop event."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from pagedserve.frontend.stoppable import in_pool, run_stoppable


def _stops_iteration(*_):
    return next(iter(()))


@pytest.mark.parametrize("stoppable", [False, True])
def test_a_stop_iteration_in_the_pool_is_a_runtime_error(stoppable):
    async def main():
        with ThreadPoolExecutor(1) as pool:
            call = run_stoppable(pool, _stops_iteration) if stoppable else in_pool(pool, _stops_iteration, 1)
            with pytest.raises(RuntimeError, match="_stops_iteration raised StopIteration"):
                await asyncio.wait_for(call, timeout=10)   # (before the fix: the timeout)
            assert await in_pool(pool, sum, [1, 2]) == 3
    asyncio.run(main())


def test_cancelling_sets_the_stop_event():
    started, seen = threading.Event(), []

    def work(stop):
        started.set()
        seen.append(stop.wait(10))

    async def main():
        with ThreadPoolExecutor(1) as pool:
            task = asyncio.ensure_future(run_stoppable(pool, work))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    asyncio.run(main())
    assert seen == [True]
