"""One streaming request per backend, timed: the OpenAI completions and chat APIs (vLLM,
pagedserve, any compatible server) and TGI's /generate_stream. Each returns a
RequestResult; an HTTP error, a bad stream or an exception is a failed request, never a
crash of the run.

Server-sent events: lines `data: {json}` (TGI writes `data:{json}`), blank lines between
events, `data: [DONE]` closes an OpenAI stream. A chunk "carries output" when it has text
or a token; TTFT is taken at the first such chunk, ITL between consecutive ones. A
completions chunk with a choice carries output even when its text is empty (tokens that
decode to nothing: special tokens, or bytes of an unfinished character), as vLLM's
benchmark counts it; otherwise such a request would fail for want of text.

TGI's stream, one event per token:
    data:{"index":1,"token":{"id":..,"text":..,"logprob":..,"special":false},
          "generated_text":null,"details":null}
    ... the last event has generated_text and details {"finish_reason", "generated_tokens", ...}
"""
from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp

from pagedserve.bench.metrics import RequestResult


@dataclass
class RequestInput:
    api_url: str
    model: str | None
    prompt: str | list[int]
    prompt_len: int
    output_len: int
    ignore_eos: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    extra_body: dict[str, Any] = field(default_factory=dict)


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[float, Any]]:
    """(arrival time, parsed JSON) per `data:` event, until [DONE] or the end of the body."""
    async for raw in response.content:
        now = time.perf_counter()
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue   # blank separators, `event:` and `:` comment lines
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        yield now, json.loads(data)


class _Timer:
    """TTFT at the first chunk that carries output, ITL between the later ones."""

    def __init__(self, result: RequestResult) -> None:
        self.result = result
        self.start = time.perf_counter()
        self.last: float | None = None
        self.chunks = 0

    def output(self, now: float) -> None:
        if self.last is None:
            self.result.ttft = now - self.start
        else:
            self.result.itl.append(now - self.last)
        self.last = now
        self.chunks += 1

    def finish(self) -> None:
        self.result.latency = time.perf_counter() - self.start


async def _post_stream(session: aiohttp.ClientSession, request: RequestInput, payload: dict[str, Any],
                       on_event: Callable[[_Timer, float, Any], None]) -> RequestResult:
    result = RequestResult(prompt_len=request.prompt_len)
    timer = _Timer(result)
    result.start_time = timer.start
    try:
        async with session.post(request.api_url, json=payload, headers=request.headers) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:500]}"
                return result
            async for now, event in sse_events(response):
                if isinstance(event, dict) and "error" in event:
                    result.error = f"stream error: {json.dumps(event['error'])[:500]}"
                    return result
                on_event(timer, now, event)
        timer.finish()
        if result.output_tokens == 0:
            result.output_tokens = timer.chunks
        result.success = timer.chunks > 0
        if not result.success:
            result.error = "the stream carried no output"
    except Exception:   # noqa: BLE001 - any failure is one failed request
        result.error = traceback.format_exc(limit=2)
    return result


def _usage(result: RequestResult, event: dict) -> None:
    usage = event.get("usage")
    if usage:
        result.output_tokens = usage.get("completion_tokens") or result.output_tokens
        result.prompt_len = usage.get("prompt_tokens") or result.prompt_len


async def openai_completions(session: aiohttp.ClientSession, request: RequestInput) -> RequestResult:
    payload = {"model": request.model, "prompt": request.prompt, "max_tokens": request.output_len,
               "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}, **request.extra_body}
    if request.ignore_eos:
        payload["ignore_eos"] = True

    def on_event(timer: _Timer, now: float, event: dict) -> None:
        choices = event.get("choices")
        if choices:   # one chunk per token step; its text may be "" (see the module doc)
            timer.output(now)
            timer.result.generated_text += "".join(choice.get("text") or "" for choice in choices)
        _usage(timer.result, event)

    return await _post_stream(session, request, payload, on_event)


async def openai_chat(session: aiohttp.ClientSession, request: RequestInput) -> RequestResult:
    payload = {"model": request.model, "messages": [{"role": "user", "content": request.prompt}],
               "max_completion_tokens": request.output_len, "temperature": 0.0, "stream": True,
               "stream_options": {"include_usage": True}, **request.extra_body}
    if request.ignore_eos:
        payload["ignore_eos"] = True

    def on_event(timer: _Timer, now: float, event: dict) -> None:
        for choice in event.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                timer.output(now)
                timer.result.generated_text += content
        _usage(timer.result, event)

    return await _post_stream(session, request, payload, on_event)


async def tgi_generate_stream(session: aiohttp.ClientSession, request: RequestInput) -> RequestResult:
    """TGI has no ignore_eos: output lengths are a cap there, not a forced length."""
    parameters = {"max_new_tokens": request.output_len, "do_sample": False, "details": True,
                  **request.extra_body}
    payload = {"inputs": request.prompt, "parameters": parameters}

    def on_event(timer: _Timer, now: float, event: dict) -> None:
        token = event.get("token")
        if token is not None:   # one event per generated token, special ones (eos) included
            timer.output(now)
            if not token.get("special", False):
                timer.result.generated_text += token.get("text", "")
        details = event.get("details")
        if details and details.get("generated_tokens") is not None:
            timer.result.output_tokens = int(details["generated_tokens"])

    return await _post_stream(session, request, payload, on_event)


RequestFunc = Callable[[aiohttp.ClientSession, RequestInput], Awaitable[RequestResult]]

# backend -> (default endpoint, request function, prompt must be text)
BACKENDS: dict[str, tuple[str, RequestFunc, bool]] = {
    "openai": ("/v1/completions", openai_completions, False),
    "openai-chat": ("/v1/chat/completions", openai_chat, True),
    "tgi": ("/generate_stream", tgi_generate_stream, True),
}
