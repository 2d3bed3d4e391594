"""What every route needs: the engine, the server's settings, and small shared helpers
(model-name check, response ids, token strings)."""
from __future__ import annotations

import asyncio
import functools
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from starlette.responses import Response, StreamingResponse

from pagedserve.errors import OverloadedError
from pagedserve.frontend.async_engine import AsyncEngine
from pagedserve.frontend.stoppable import surfacing
from pagedserve.lora_request import LoRARequest
from pagedserve.outputs import Logprob
from pagedserve.server.bench_results import DEFAULT_RESULTS_DIR
from pagedserve.server.errors import NotFoundError

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 2**20
DEFAULT_MAX_WAITING_REQUESTS = 1024   # engine requests queued beyond max_num_seqs, both APIs
T = TypeVar("T")


# huggingface_hub's InferenceClient sends "dummy" (chat_completion without a model) and
# TGI's own clients "tgi": a TGI server serves one model and reads neither
TGI_CLIENT_PLACEHOLDERS = frozenset({"tgi", "dummy"})


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    model_root: str | None = None       # what /v1/models reports as `root`
    api_key: str | None = None          # None: no authentication
    chat_template: str | None = None    # overrides the tokenizer's template
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    # H2 (issue 16, item 5): admission at the edge, both APIs (AdmissionLimit)
    max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS
    max_concurrent_requests: int | None = None   # TGI's setting, when given, bounds the OpenAI routes too
    # H3 (issue 16, item 17): vLLM's server flags
    served_model_aliases: tuple[str, ...] = ()   # --served-model-name's further names (also accepted)
    return_tokens_as_token_ids: bool = False     # logprobs tokens as "token_id:N" by default
    enable_force_include_usage: bool = False     # usage on every stream, as if include_usage were set
    # issue 20, part 4: tool calling ("auto" needs both, as in vLLM)
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None          # one of tool_calls.TOOL_CALL_PARSERS
    # issue 23: where /dashboard/results reads benchmark figures (fixed at start-up)
    dashboard_results_dir: Path = DEFAULT_RESULTS_DIR
    # --lora-modules: LoRA adapters served under their own model names (TGI's adapter_id too)
    lora_modules: tuple[LoRARequest, ...] = ()
    reasoning_parser: str | None = None   # --reasoning-parser (server/reasoning.py): chat's `reasoning` apart


@dataclass
class ServerContext:
    engine: AsyncEngine
    settings: ServerSettings
    created: int = field(default_factory=lambda: int(time.time()))
    # LoRA adapters by model name: --lora-modules', and those loaded at run time (lora_routes.py)
    loras: dict[str, LoRARequest] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.loras.update((lora.lora_name, lora) for lora in self.settings.lora_modules)

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name

    @property
    def served_model_names(self) -> tuple[str, ...]:
        return (self.settings.served_model_name, *self.settings.served_model_aliases)

    def check_model(self, model: str | None) -> LoRARequest | None:
        """An absent model means the served one, and so do the placeholders TGI's clients send
        on the shared chat route (TGI ignores the field); a --lora-modules name is the base
        model with that adapter (returned); any other name is a 404 (OpenAI's and vLLM's
        NotFoundError) naming `model`."""
        if model is None or model in self.served_model_names or model in TGI_CLIENT_PLACEHOLDERS:
            return None
        lora = self.loras.get(model)
        if lora is None:
            raise NotFoundError(f"The model `{model}` does not exist.", "model")
        return lora

    def response_model(self, model: str | None) -> str:
        """The `model` a response names: a LoRA adapter's own name (as vLLM), else the served name."""
        return model if model in self.loras else self.model_name

    def token_str(self, token_id: int, logprob: Logprob | None = None, as_token_id: bool = False) -> str:
        """A token as OpenAI logprobs show it: its own decoded text, or `token_id:N`."""
        if as_token_id:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.engine.tokenizer.decode([token_id])

    def decode(self, token_ids: list[int]) -> str:
        return self.engine.tokenizer.decode(token_ids)


def new_request_id(prefix: str, requested: str | None = None) -> tuple[str, str]:
    """(response id shown to the client, engine request id, unique even if `requested` is not)."""
    unique = uuid.uuid4().hex
    return f"{prefix}-{requested or unique}", f"{prefix}-{unique}"


async def off_loop(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run CPU-bound request work (tokenizing, rendering a chat template) in a worker thread
    so the event loop (and /health) stays responsive whatever the request holds."""
    return await asyncio.to_thread(surfacing, functools.partial(function, **kwargs), *args)


class AdmissionLimit:
    """The edge's bound on work in flight, shared by both APIs (event loop only, so plain
    counters): engine requests (one per prompt) up to max_num_seqs + max_waiting_requests,
    HTTP generation requests up to max_concurrent_requests when set, and TGI generations up
    to TGI's own max_concurrent_requests (default 128). One more is an OverloadedError
    (OpenAI 503 / TGI 429, with Retry-After) before anything is queued."""

    def __init__(self, max_engine_requests: int, max_http_requests: int | None = None,
                 max_tgi_requests: int | None = None) -> None:
        self.max_engine_requests = max_engine_requests
        self.max_http_requests = max_http_requests
        self.max_tgi_requests = max_tgi_requests
        self.engine_requests = 0
        self.http_requests = 0
        self.tgi_requests = 0

    def admit(self, num_engine_requests: int = 1, tgi: bool = False) -> "Admission":
        if tgi and self.max_tgi_requests is not None and self.tgi_requests >= self.max_tgi_requests:
            raise OverloadedError("Model is overloaded")
        if self.max_http_requests is not None and self.http_requests >= self.max_http_requests:
            raise OverloadedError(f"the server is overloaded: {self.http_requests} requests in flight "
                                  f"(max_concurrent_requests {self.max_http_requests}); retry later")
        if self.engine_requests + num_engine_requests > self.max_engine_requests:
            raise OverloadedError(f"the server is overloaded: {self.engine_requests} requests running or waiting "
                                  f"(at most {self.max_engine_requests}: max_num_seqs + --max-waiting-requests); "
                                  "retry later")
        self.engine_requests += num_engine_requests
        self.http_requests += 1
        self.tgi_requests += tgi
        return Admission(self, num_engine_requests, tgi)


class Admission:
    """One admitted HTTP request; release() (idempotent) gives its share back."""

    def __init__(self, limit: AdmissionLimit, num_engine_requests: int, tgi: bool) -> None:
        self.limit = limit
        self.num_engine_requests = num_engine_requests
        self.tgi = tgi
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limit.engine_requests -= self.num_engine_requests
            self.limit.http_requests -= 1
            self.limit.tgi_requests -= self.tgi

    async def respond(self, make_response: Callable[[], Awaitable[Response]]) -> Response:
        """The route's response, holding this admission until it is sent (released at once
        if making it fails)."""
        try:
            return self.hold_until_sent(await make_response())
        except BaseException:
            self.release()
            raise

    def hold_until_sent(self, response: Response) -> Response:
        """Release now, or, for a streamed response, when its body iterator closes (finished,
        failed or the client gone: SSEResponse always closes it)."""
        if not isinstance(response, StreamingResponse):
            self.release()
            return response
        response.body_iterator = self._released_after(response.body_iterator)
        return response

    async def _released_after(self, body: AsyncIterator[Any]) -> AsyncIterator[Any]:
        try:
            async for chunk in body:
                yield chunk
        finally:
            self.release()
            close = getattr(body, "aclose", None)
            if close is not None:
                await close()
