"""Plumbing shared by the routes: adding a request's prompts together, merging their output
streams, Server-Sent Events (both APIs), and aborting when the client goes away.

Disconnects: a streamed response closes its body iterator when the client is gone (the
iterator's `finally` closes the engine streams, which aborts them); a non-streamed request
races its result against `http.disconnect`."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, Sequence, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Send

from pagedserve.lora_request import LoRARequest
from pagedserve.frontend.async_engine import AsyncEngine, RequestStream
from pagedserve.frontend.input_processor import PromptType
from pagedserve.frontend.output_processor import OutputKind
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.server.errors import API, ClientDisconnected

T = TypeVar("T")
DONE_EVENT = "data: [DONE]\n\n"


def sse_event(payload: dict[str, Any], api: API = API.OPENAI) -> str:
    """One `data:` event; TGI's (axum's) framing has no space after the colon."""
    prefix = "data:" if api is API.TGI else "data: "
    return f"{prefix}{json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class SSEResponse(StreamingResponse):
    """text/event-stream whose body iterator is always closed when sending stops (finished,
    client gone, or cancelled), so the generator's `finally` runs at once."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


async def add_prompts(engine: AsyncEngine, request_id: str, prompts: Sequence[PromptType], params: SamplingParams,
                      output_kind: OutputKind, add_special_tokens: bool, priority: int = 0,
                      lora_request: LoRARequest | None = None) -> list[RequestStream]:
    """Add every prompt at once (one engine iteration); all or nothing."""
    if params.structured_outputs is not None and len(prompts) > 1:   # one compile, then cache hits
        await engine.compile_grammar(params.structured_outputs)
    results = await asyncio.gather(
        *(engine.add_request(f"{request_id}-{i}", prompt, params, output_kind, strict_length=True,
                             add_special_tokens=add_special_tokens, priority=priority, lora_request=lora_request)
          for i, prompt in enumerate(prompts)),
        return_exceptions=True)
    streams = [r for r in results if isinstance(r, RequestStream)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for stream in streams:
            stream.close()
        raise errors[0]
    return streams


async def merge_streams(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams as they come; the first error is raised."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    finished = object()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
            queue.put_nowait((index, finished))
        except Exception as exc:
            queue.put_nowait((index, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is finished:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def final_outputs(streams: Sequence[RequestStream]) -> list[RequestOutput]:
    """The last output of each stream (FINAL_ONLY streams yield just that one)."""
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for index, output in merge_streams(streams):
        finals[index] = output
    missing = [i for i, f in enumerate(finals) if f is None]
    if missing:
        raise RuntimeError(f"prompt {missing[0]} ended without an output")
    return finals   # type: ignore[return-value]


async def unless_disconnected(awaitable: Awaitable[T], request: Request) -> T:
    """Await `awaitable`; if the client disconnects first, cancel it and raise
    ClientDisconnected."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
            # retrieved once it settles: a gather's future can end with an exception rather
            # than cancelled, which asyncio would log as never retrieved
            work.add_done_callback(lambda done: done.cancelled() or done.exception())
        watcher.cancel()
    if not work.done() or work.cancelled():
        raise ClientDisconnected()
    return work.result()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def close_all(streams: Sequence[RequestStream]) -> None:
    for stream in streams:
        stream.close()
