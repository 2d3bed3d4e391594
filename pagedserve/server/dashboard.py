"""The live dashboard: the engine's KV blocks, batching timeline and benchmark figures.

    GET /dashboard                  the page (static files in dashboard_static/, no build step)
    GET /dashboard/static/{name}    its script and style sheet (a fixed set of files)
    GET /dashboard/events           Server-Sent Events: one frame per engine snapshot, <= 10 a second;
                                    at most MAX_VIEWERS at once (a 503 past that), each counted
                                    when its request is answered and given back however it ends
    GET /dashboard/results          figures from the results directory (bench_results.py)

With an API key set, every one of them needs it (middleware.py): the Authorization header,
or the `pagedserve_api_key` cookie that the page's key form sets (a browser sends no header
when it navigates or opens an EventSource).

Cost to the engine: nothing while nobody watches (no snapshot is asked for, no step is
logged). While someone does, a ticker on the event loop asks the engine thread for one
EngineSnapshot (core/snapshot.py) every SNAPSHOT_INTERVAL_S, or less often: the interval
stretches to 1 / MAX_COST_SHARE (400) times what the last snapshot cost to build (engine thread)
and encode (here), so snapshots never take more than ~0.25% of the time. The cost is the CPU
time of the two threads (time.thread_time), not the wall time: on a loaded machine a thread
preempted for 10 ms mid-encode would otherwise stretch the next interval to 4 s, and the page
would miss whole requests. A frame is encoded once, on the event loop, and shared by every
viewer; a viewer holds only a flag "something new" and its cursor into the step history, so a
slow client skips frames (it gets the latest snapshot and the steps it missed, up to
HISTORY_STEPS) and stalls nobody.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.types import Receive, Scope, Send

from pagedserve.core.snapshot import EngineSnapshot, RequestView, StepView
from pagedserve.frontend.async_engine import AsyncEngine
from pagedserve.server.bench_results import read_results
from pagedserve.server.errors import NotFoundError, ServiceUnavailableError, error_response
from pagedserve.server.streaming import SSEResponse

logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "dashboard_static"
STATIC_FILES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
SNAPSHOT_INTERVAL_S = 0.1   # at most 10 snapshots a second
MAX_COST_SHARE = 0.0025     # snapshots never take more than this share of the wall time
HISTORY_STEPS = 1024        # steps a (new or slow) viewer can still be sent
MAX_VIEWERS = 16
KEEPALIVE_S = 15.0


@dataclass(eq=False)
class _Viewer:
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    cursor: int = -1   # the last step sent


class DashboardHub:
    """Event-loop side of the dashboard: asks the engine for snapshots while anyone watches,
    encodes each once, and wakes the viewers."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.viewers: set[_Viewer] = set()
        self.history: deque[tuple[int, str]] = deque(maxlen=HISTORY_STEPS)   # (step, its JSON)
        self.latest: str | None = None   # the newest snapshot's JSON (without steps)
        self.num_snapshots = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker: asyncio.Task | None = None
        self._last_cost_s = 0.0
        engine.add_snapshot_listener(self._from_engine_thread)

    # ---- viewers ------------------------------------------------------------------------
    def admit(self) -> _Viewer | None:
        """A new viewer, counted now (when its request is answered, before its stream starts,
        so simultaneous requests cannot all pass the check); None when MAX_VIEWERS watch.
        Its place is given back by leave(), which ViewerResponse calls however it ends."""
        if len(self.viewers) >= MAX_VIEWERS:
            return None
        viewer = _Viewer()
        self._join(viewer)
        return viewer

    async def stream(self, viewer: _Viewer) -> AsyncIterator[str]:
        """One viewer's SSE frames until it goes away (`viewer`: one admit() returned)."""
        try:
            yield ": connected\n\n"
            if self.latest is not None:
                viewer.wake.set()
            while True:
                try:
                    await asyncio.wait_for(viewer.wake.wait(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                viewer.wake.clear()
                yield self._frame(viewer)
        finally:
            self.leave(viewer)

    def _join(self, viewer: _Viewer) -> None:
        self._loop = asyncio.get_running_loop()
        self.viewers.add(viewer)
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick())

    def leave(self, viewer: _Viewer) -> None:
        """Give back `viewer`'s place (idempotent); the last one out stops the snapshots."""
        if viewer not in self.viewers:
            return
        self.viewers.discard(viewer)
        if not self.viewers:
            if self._ticker is not None:
                self._ticker.cancel()
                self._ticker = None
            self.engine.stop_snapshots()

    async def _tick(self) -> None:
        while self.viewers:
            self.engine.request_snapshot()
            await asyncio.sleep(snapshot_interval(self._last_cost_s))

    def _frame(self, viewer: _Viewer) -> str:
        steps = [text for step, text in self.history if step > viewer.cursor]
        if self.history:
            viewer.cursor = self.history[-1][0]
        return f'data: {{"snapshot":{self.latest},"steps":[{",".join(steps)}]}}\n\n'

    # ---- snapshots ----------------------------------------------------------------------
    def _from_engine_thread(self, snapshot: EngineSnapshot) -> None:
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self.publish, snapshot)
            except RuntimeError:   # the loop is closed: nobody watches
                pass

    def publish(self, snapshot: EngineSnapshot) -> None:
        """Encode a snapshot once and wake every viewer (event loop only)."""
        started = time.thread_time()
        if snapshot.steps and self.history and snapshot.steps[0].step <= self.history[-1][0]:
            self.history.clear()   # the engine's step log restarted (nobody watched for a while)
        self.history.extend((s.step, encode_step(s)) for s in snapshot.steps)
        latest = encode_snapshot(snapshot, self.model_name)
        self._last_cost_s = time.thread_time() - started + snapshot.build_seconds
        changed = bool(snapshot.steps) or _state_of(latest) != _state_of(self.latest)
        self.latest = latest
        self.num_snapshots += 1
        if changed:   # an idle engine's snapshots repeat themselves: nothing to send
            for viewer in self.viewers:
                viewer.wake.set()


class ViewerResponse(SSEResponse):
    """One admitted viewer's stream. Its place is given back however the response ends: the
    stream's own `finally` runs only if the stream started, so __call__ gives it back too
    (the client gone before the first frame, the response cancelled or failing to start)."""

    def __init__(self, hub: DashboardHub, viewer: _Viewer) -> None:
        super().__init__(hub.stream(viewer))
        self.hub = hub
        self.viewer = viewer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.hub.leave(self.viewer)


def _state_of(encoded: str | None) -> str | None:
    """An encoded snapshot without its time (which leads: see encode_snapshot)."""
    return None if encoded is None else encoded[encoded.index('"model"'):]


def snapshot_interval(cost_s: float) -> float:
    """Seconds until the next snapshot, after one that cost `cost_s` to build and encode."""
    return max(SNAPSHOT_INTERVAL_S, cost_s / MAX_COST_SHARE)


def encode_snapshot(snapshot: EngineSnapshot, model_name: str) -> str:
    """The snapshot as the page reads it: per-block arrays in base64, request views as lists."""
    return json.dumps({
        "time": snapshot.time, "model": model_name, "step": snapshot.step,
        "tokens_per_s": round(snapshot.tokens_per_s, 1), "generated_per_s": round(snapshot.generated_per_s, 1),
        "block_size": snapshot.block_size, "max_model_len": snapshot.max_model_len,
        "max_num_seqs": snapshot.max_num_seqs, "num_blocks": snapshot.num_blocks,
        "ref_counts": base64.b64encode(snapshot.ref_counts).decode(),
        "cached": base64.b64encode(snapshot.cached).decode(),
        "request_fields": REQUEST_FIELDS,
        "running": [_request(r) for r in snapshot.running], "waiting": [_request(r) for r in snapshot.waiting],
        "dropped_steps": snapshot.num_dropped_steps, "num_preemptions": snapshot.num_preemptions,
        "kv_cache_usage": snapshot.kv_cache_usage,
    }, separators=(",", ":"))


REQUEST_FIELDS = ("id", "parent", "prompt", "output", "computed", "cached", "max_tokens", "preemptions", "blocks")


def _request(r: RequestView) -> tuple:
    """A request as a list in REQUEST_FIELDS order (lists encode faster than objects)."""
    return (r.req_id, r.parent_id, r.num_prompt_tokens, r.num_output_tokens, r.num_computed_tokens,
            r.num_cached_tokens, r.max_tokens, r.num_preemptions, r.block_ids)


def encode_step(s: StepView) -> str:
    """One step; a `repeat` step (the requests of the step before, one decode token each)
    carries no per-request data: most steps cost the same whatever the batch size."""
    if s.repeat and not (s.preempted or s.arrived or s.finished):
        return f'{{"step":{s.step},"t":{s.time!r},"repeat":1,"generated":{s.num_generated}}}'
    return json.dumps({"step": s.step, "t": s.time, "repeat": int(s.repeat), "tokens": s.scheduled,
                       "prefill": s.prefill, "preempted": s.preempted, "arrived": s.arrived, "finished": s.finished,
                       "generated": s.num_generated}, separators=(",", ":"))


def add_dashboard_routes(app: FastAPI, hub: DashboardHub, results_dir: Path) -> None:
    @app.get("/dashboard")
    async def page() -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC_FILES:   # a fixed set: no path from the request reaches the disk
            return error_response(NotFoundError(f"no dashboard file {name!r}"))
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/events")
    async def events() -> Response:
        viewer = hub.admit()   # counted here, in the same event-loop turn as the check
        if viewer is None:
            return error_response(ServiceUnavailableError(f"at most {MAX_VIEWERS} dashboard viewers at a time"))
        return ViewerResponse(hub, viewer)

    @app.get("/dashboard/results")
    async def results() -> Response:
        figures = await asyncio.to_thread(read_results, results_dir)
        return JSONResponse({"results_dir": results_dir.name, "figures": figures})

