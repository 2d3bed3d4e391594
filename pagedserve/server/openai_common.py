"""What both OpenAI generation routes share beyond the plumbing of streaming.py: the usage
options of a stream (vLLM's rule, with --enable-force-include-usage), the warning for
accepted-and-ignored spec fields, truncate_prompt_tokens, and the per-request parameter
metrics (request_params_n / request_params_max_tokens, observed at the first output, when
the prompt's length is known)."""
from __future__ import annotations

import logging
from typing import Any

from fastapi import Request

from pagedserve.server.context import ServerContext
from pagedserve.server.openai_protocol import (StreamOptions, check_truncate_prompt_tokens,
                                               ignored_fields_set)

logger = logging.getLogger(__name__)


def usage_options(options: StreamOptions | None, force: bool) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of a stream, as vLLM decides them: usage only
    when asked for (or forced by the server); continuous stats only together with usage."""
    if options is None:
        return force, False
    include = bool(options.include_usage) or force
    return include, include and bool(options.continuous_usage_stats)


def warn_ignored_fields(request: Any, route: str) -> None:
    names = ignored_fields_set(request)
    if names:
        logger.warning("%s: the following fields were present in the request but ignored: %s", route,
                       ", ".join(names))


async def truncate_prompts(ctx: ServerContext, prompts: list[str | list[int]], truncate: int | None,
                           add_special_tokens: bool) -> list[str | list[int]]:
    """Prompts cut to their last k tokens (vLLM's truncate_prompt_tokens); text prompts are
    tokenized in the engine's processing pool, never on the event loop, from a suffix where
    that gives the same tokens (AsyncLLMEngine.tokenize_prompt)."""
    keep = check_truncate_prompt_tokens(truncate, ctx.engine.max_model_len)
    if keep is None:
        return prompts
    truncated: list[str | list[int]] = []
    for prompt in prompts:
        ids = prompt if isinstance(prompt, list) else await ctx.engine.tokenize_prompt(prompt, add_special_tokens, keep)
        truncated.append(list(ids[-keep:]))
    return truncated


def params_observer(raw_request: Request, n: int, max_tokens: int | None, max_model_len: int):
    """A callable(num_prompt_tokens) that feeds request_params_n / _max_tokens once per prompt
    (max_tokens left unset is what the engine uses: max_model_len - prompt length)."""
    metrics = getattr(raw_request.app.state, "metrics", None)

    def observe(num_prompt_tokens: int) -> None:
        if metrics is not None:
            effective = max_tokens if max_tokens is not None else max(max_model_len - num_prompt_tokens, 0)
            metrics.observe_request_params(n, effective)

    return observe
