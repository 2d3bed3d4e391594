"""Engine logprobs (one {token id: Logprob} dict per position) in OpenAI's two shapes:

    completions: {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{text: lp}, ...],
                  "text_offset": [...]}             (None entries for the first prompt token)
    chat:        {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
                  "logprob", "bytes"}, ...]}, ...]}

-inf is not JSON: logprobs are clamped at -9999.0, as vLLM does."""
from __future__ import annotations

from typing import Any

from pagedserve.outputs import Logprob, PromptLogprobs
from pagedserve.server.context import ServerContext

MIN_LOGPROB = -9999.0


def _ranked(step: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(step.items(), key=lambda item: (item[1].rank is None, item[1].rank or 0))


def clamp_logprob(value: float) -> float:
    """-inf (a masked token) and below -> MIN_LOGPROB: JSON has no infinities."""
    return max(value, MIN_LOGPROB)


class CompletionLogprobs:
    """Accumulates the completions logprobs object of one choice; text_offset counts
    characters of everything returned before (echoed prompt included)."""

    def __init__(self, ctx: ServerContext, as_token_ids: bool, initial_offset: int = 0) -> None:
        self.ctx = ctx
        self.as_token_ids = as_token_ids
        self.offset = initial_offset

    def build(self, token_ids: list[int], logprobs: list[dict[int, Logprob] | None]) -> dict[str, Any]:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset: list[int] = []
        for token_id, step in zip(token_ids, logprobs):
            if step is None:   # the first prompt token has no logprob
                token = self.ctx.token_str(token_id, None, self.as_token_ids)
                token_logprobs.append(None)
                top_logprobs.append(None)
            else:
                chosen = step.get(token_id)
                token = self.ctx.token_str(token_id, chosen, self.as_token_ids)
                token_logprobs.append(clamp_logprob(chosen.logprob) if chosen is not None else None)
                top_logprobs.append({self.ctx.token_str(tid, lp, self.as_token_ids): clamp_logprob(lp.logprob)
                                     for tid, lp in _ranked(step)})
            tokens.append(token)
            text_offset.append(self.offset)
            self.offset += len(token)
        return {"text_offset": text_offset, "token_logprobs": token_logprobs, "tokens": tokens,
                "top_logprobs": top_logprobs}


def chat_logprobs(ctx: ServerContext, token_ids: list[int], logprobs: list[dict[int, Logprob]],
                  top_logprobs: int, as_token_ids: bool = False) -> dict[str, Any]:
    content = []
    for token_id, step in zip(token_ids, logprobs):
        chosen = step.get(token_id)
        token = ctx.token_str(token_id, chosen, as_token_ids)
        top = []
        for tid, lp in (_ranked(step) if top_logprobs < 0 else _ranked(step)[:top_logprobs]):   # -1: all
            text = ctx.token_str(tid, lp, as_token_ids)
            top.append({"token": text, "logprob": clamp_logprob(lp.logprob), "bytes": list(text.encode("utf-8"))})
        content.append({"token": token, "logprob": clamp_logprob(chosen.logprob) if chosen is not None else MIN_LOGPROB,
                        "bytes": list(token.encode("utf-8")), "top_logprobs": top})
    return {"content": content}


def prompt_logprobs_json(prompt_logprobs: PromptLogprobs | None) -> list[dict[str, dict] | None] | None:
    """vLLM's `prompt_logprobs` extra: per prompt position, token id -> logprob, rank, text."""
    if prompt_logprobs is None:
        return None
    return [None if step is None else
            {str(tid): {"logprob": clamp_logprob(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
             for tid, lp in step.items()} for step in prompt_logprobs]
