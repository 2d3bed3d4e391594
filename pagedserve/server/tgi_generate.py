"""TGI's generation responses from engine outputs: POST /generate's
{"generated_text", "details"} and POST /generate_stream's one SSE event per token.
As TGI's, `details` comes only when asked for (parameters.details, or decoder_input_details on
/generate); otherwise /generate answers {"generated_text"} and the stream's last event has
"details": null.

best_of=N runs N sampled sequences (n=N): the answer is the one with the highest cumulative
logprob, the others go to details.best_of_sequences. Sequence i is seeded seed + i."""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import Request

from pagedserve.errors import ValidationError
from pagedserve.frontend.async_engine import RequestStream
from pagedserve.frontend.output_processor import OutputKind
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput, tgi_finish_reason
from pagedserve.server import structured
from pagedserve.server.context import ServerContext
from pagedserve.server.errors import API, ClientDisconnected, IncompleteGenerationError, describe
from pagedserve.server.metrics import TGIMetrics
from pagedserve.server.openai_logprobs import clamp_logprob
from pagedserve.server.streaming import sse_event, unless_disconnected
from pagedserve.server.tgi_protocol import ValidGenerateRequest


@dataclass
class TokenBuilder:
    """Token ids -> TGI's Token objects {"id", "text", "logprob", "special"}."""

    ctx: ServerContext

    def __post_init__(self) -> None:
        self.special_ids = set(getattr(self.ctx.engine.tokenizer, "all_special_ids", []) or [])

    def token(self, token_id: int, logprob: float | None, text: str | None = None) -> dict[str, Any]:
        if text is None:
            text = self.ctx.decode([token_id])
        # -inf (a token a grammar masked, among top_n_tokens) is not JSON: clamped as the OpenAI routes do
        return {"id": token_id, "text": text, "logprob": None if logprob is None else clamp_logprob(logprob),
                "special": token_id in self.special_ids}

    def from_entry(self, token_id: int, entry: dict[int, Logprob] | None, text: str | None = None) -> dict[str, Any]:
        chosen = entry.get(token_id) if entry else None
        if text is None and chosen is not None:
            text = chosen.decoded_token
        return self.token(token_id, chosen.logprob if chosen is not None else None, text)

    def top(self, entry: dict[int, Logprob] | None, top_n: int) -> list[dict[str, Any]]:
        """The top_n alternatives, best first (the entry holds the sampled token too)."""
        if not top_n or not entry:
            return []
        best = sorted(entry.items(), key=lambda item: item[1].logprob, reverse=True)[:top_n]
        return [self.token(tid, lp.logprob, lp.decoded_token) for tid, lp in best]


async def start(ctx: ServerContext, valid: ValidGenerateRequest, kind: OutputKind) -> RequestStream:
    lora = None
    if valid.adapter_id is not None and valid.adapter_id != ctx.model_name:   # TGI: the base model's own id
        lora = ctx.loras.get(valid.adapter_id)
        if lora is None:
            raise ValidationError(f"adapter_id {valid.adapter_id!r} is not one of this server's LoRA adapters "
                                  f"({', '.join(ctx.loras) or 'none loaded'})")
    with structured.naming(valid.constraint):   # a grammar that fails to compile: 422 naming parameters.grammar
        stream = await ctx.engine.add_request(f"tgi-{uuid.uuid4().hex}", {"prompt_token_ids": valid.input_ids},
                                              valid.params, kind, strict_length=True, lora_request=lora)
    return structured.named_streams([stream], valid.constraint)[0]   # and a grammar's dead end found later


async def generate(ctx: ServerContext, valid: ValidGenerateRequest, raw_request: Request,
                   metrics: TGIMetrics) -> dict[str, Any]:
    """POST /generate's body; raises on failure (the caller answers with TGI's error)."""
    arrival = time.monotonic()
    stream = await start(ctx, valid, OutputKind.FINAL_ONLY)
    try:
        final = await unless_disconnected(_last(stream), raw_request)
    finally:
        stream.close()
    builder = TokenBuilder(ctx)
    sequences = sorted(final.outputs, key=lambda c: c.index)
    best = max(sequences, key=lambda c: c.cumulative_logprob or 0.0) if len(sequences) > 1 else sequences[0]
    body: dict[str, Any] = {"generated_text": _text(valid, best)}
    if valid.details or valid.decoder_input_details:   # TGI's rule (its server.rs generate_internal)
        details = _sequence_details(builder, valid, best, _seed(valid, best))
        details["prefill"] = _prefill(builder, final) if valid.decoder_input_details else []
        if len(sequences) > 1:
            others = []
            for seq in sequences:
                if seq is not best:
                    other = {"generated_text": _text(valid, seq), **_sequence_details(builder, valid, seq,
                                                                                      _seed(valid, seq))}
                    other["prefill"] = details["prefill"]
                    others.append(other)
            details["best_of_sequences"] = others
        body["details"] = details
    first_token_time = final.metrics.get("first_token_time")
    metrics.observe_success(time.monotonic() - arrival,
                            None if first_token_time is None else first_token_time - final.metrics["arrival_time"],
                            len(best.token_ids))
    return body


async def generate_stream(ctx: ServerContext, valid: ValidGenerateRequest, stream: RequestStream,
                          metrics: TGIMetrics, on_close: Callable[[], None]) -> AsyncIterator[str]:
    """One event per generated token; the last carries generated_text (and details)."""
    arrival = time.monotonic()
    builder = TokenBuilder(ctx)
    num_tokens = 0
    text_parts: list[str] = []
    queue_s: float | None = None
    try:
        async for output in stream:
            if queue_s is None and "first_token_time" in output.metrics:
                queue_s = output.metrics["first_token_time"] - output.metrics["arrival_time"]
            if not output.outputs:
                continue
            completion = output.outputs[0]
            text_parts.append(completion.text)
            ids = completion.token_ids
            if not ids:
                if completion.finish_reason is not None:
                    raise IncompleteGenerationError("the request ended before its last token")
                continue
            entries = completion.logprobs or []
            for i, token_id in enumerate(ids):
                num_tokens += 1
                last_of_delta = i == len(ids) - 1
                entry = entries[i] if i < len(entries) else None
                event: dict[str, Any] = {
                    "index": num_tokens,
                    # the delta's text rides on its last token, so the texts add up to generated_text
                    "token": builder.from_entry(token_id, entry, completion.text if last_of_delta else ""),
                    "top_tokens": builder.top(entry, valid.top_n_tokens),
                    "generated_text": None, "details": None}
                if last_of_delta and completion.finish_reason is not None:
                    full = "".join(text_parts)
                    event["generated_text"] = valid.inputs + full if valid.return_full_text else full
                    if valid.details:
                        event["details"] = {
                            "finish_reason": tgi_finish_reason(completion.finish_reason, completion.stop_reason),
                            "generated_tokens": num_tokens, "seed": valid.seed,
                            "input_length": len(valid.input_ids)}
                yield sse_event(event, API.TGI)
        metrics.observe_success(time.monotonic() - arrival, queue_s, num_tokens)
    except Exception as exc:
        error = describe(exc, API.TGI)
        metrics.observe_failure(error.type)
        yield sse_event(error.body(), API.TGI)
    except (GeneratorExit, asyncio.CancelledError):   # the client went away mid-stream: TGI's "dropped"
        metrics.observe_failure(describe(ClientDisconnected(), API.TGI).type)
        raise
    finally:
        stream.close()
        on_close()


async def _last(stream: RequestStream) -> RequestOutput:
    final = None
    async for output in stream:
        final = output
    if final is None or not final.outputs:
        raise IncompleteGenerationError("the request ended without an output")
    return final


def _text(valid: ValidGenerateRequest, completion: CompletionOutput) -> str:
    return valid.inputs + completion.text if valid.return_full_text else completion.text


def _seed(valid: ValidGenerateRequest, completion: CompletionOutput) -> int | None:
    if valid.seed is None:
        return None
    return valid.seed + completion.index if valid.best_of > 1 else valid.seed


def _sequence_details(builder: TokenBuilder, valid: ValidGenerateRequest, completion: CompletionOutput,
                      seed: int | None) -> dict[str, Any]:
    entries = completion.logprobs or []
    tokens = [builder.from_entry(tid, entries[i] if i < len(entries) else None)
              for i, tid in enumerate(completion.token_ids)]
    details: dict[str, Any] = {
        "finish_reason": tgi_finish_reason(completion.finish_reason, completion.stop_reason),
        "generated_tokens": len(completion.token_ids), "seed": seed, "tokens": tokens}
    if valid.top_n_tokens:
        details["top_tokens"] = [builder.top(entries[i] if i < len(entries) else None, valid.top_n_tokens)
                                 for i in range(len(completion.token_ids))]
    return details


def _prefill(builder: TokenBuilder, output: RequestOutput) -> list[dict[str, Any]]:
    """The input tokens with their logprobs (the first has none), as TGI's PrefillToken."""
    entries = list(output.prompt_logprobs or [])
    prefill = []
    for position, token_id in enumerate(output.prompt_token_ids):
        entry = entries[position] if position < len(entries) else None
        token = builder.from_entry(token_id, entry)
        prefill.append({"id": token["id"], "text": token["text"], "logprob": token["logprob"]})
    return prefill
