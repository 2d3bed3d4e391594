"""The dashboard's event-loop side (server/dashboard.py) without a server: snapshots are
asked for only while someone watches, a slow viewer holds one flag and a cursor (it skips
frames, never queues them) and still gets every step it missed, within the history bound."""
from __future__ import annotations

import asyncio
import json

from pagedserve.core.snapshot import EngineSnapshot, StepView
from pagedserve.engine_io import RequestId
from pagedserve.server import dashboard
from pagedserve.server.dashboard import DashboardHub


class FakeEngine:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.listeners = []

    def add_snapshot_listener(self, listener) -> None:
        self.listeners.append(listener)

    def request_snapshot(self) -> None:
        self.calls.append("request")

    def stop_snapshots(self) -> None:
        self.calls.append("stop")


def snapshot(steps: range, used: int = 1) -> EngineSnapshot:
    views = tuple(StepView(i, float(i), {RequestId("r"): 1}, (), (), (), (), 1) for i in steps)
    return EngineSnapshot(0.0, steps.stop - 1 if steps else 0, 16, 512, 8, bytes([1] * used + [0] * (8 - used)),
                          bytes(8), (), (), views, 0, 0, used / 8, 0.0, 0.0)


def frames_of(text: str) -> dict:
    assert text.startswith("data: ") and text.endswith("\n\n")
    return json.loads(text[6:])


def test_snapshots_are_asked_for_only_while_someone_watches():
    async def main():
        engine = FakeEngine()
        hub = DashboardHub(engine, "m")
        stream = hub.stream(hub.admit())
        assert await stream.__anext__() == ": connected\n\n"
        await asyncio.sleep(0.35)   # the ticker: one request every 0.1 s
        asked = engine.calls.count("request")
        await stream.aclose()
        await asyncio.sleep(0.25)
        return asked, list(engine.calls)

    asked, calls = asyncio.run(main())
    assert 3 <= asked <= 5 and calls[-1] == "stop" and calls.count("request") == asked


def test_a_slow_viewer_skips_frames_but_gets_every_step(monkeypatch):
    async def main():
        engine = FakeEngine()
        hub = DashboardHub(engine, "m")
        stream = hub.stream(hub.admit())
        await stream.__anext__()
        for i in range(50):   # the viewer reads nothing meanwhile
            hub.publish(snapshot(range(2 * i + 1, 2 * i + 3), used=1 + i % 8))
        (viewer,) = hub.viewers
        first = frames_of(await stream.__anext__())
        hub.publish(snapshot(range(0)))   # no steps, but another state (1 block in use): sent
        second = frames_of(await stream.__anext__())
        hub.publish(snapshot(range(0)))   # the same state again: nobody is woken
        woken = viewer.wake.is_set()
        for i in range(dashboard.HISTORY_STEPS + 10):
            hub.publish(snapshot(range(101 + i, 102 + i)))
        third = frames_of(await stream.__anext__())
        await stream.aclose()
        return first, second, woken, third

    first, second, woken, third = asyncio.run(main())
    assert [s["step"] for s in first["steps"]] == list(range(1, 101))
    assert first["snapshot"]["ref_counts"] == "AQEAAAAAAAA=" and first["snapshot"]["kv_cache_usage"] == 0.25
    assert second["steps"] == [] and second["snapshot"]["kv_cache_usage"] == 0.125
    assert not woken
    steps = [s["step"] for s in third["steps"]]
    assert len(steps) == dashboard.HISTORY_STEPS and steps[-1] == 100 + dashboard.HISTORY_STEPS + 10
