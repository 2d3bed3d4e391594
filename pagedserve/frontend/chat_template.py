"""Rendering a chat template sent in a request (untrusted) under bounds: jinja2's immutable
sandbox, a wall-clock deadline, a cap on the rendered size, on `range()` and on the size of
`*` / `**` results. Past a bound: ValidationError naming `chat_template`, never a hang or a 500.

The deadline is enforced by a trace function installed in the rendering thread only
(sys.settrace): jinja2 compiles templates to Python code, so every loop iteration of a
template runs traced lines, and the tracer raises once the deadline has passed. Run it on a
worker thread (AsyncEngine does): the caller's thread is busy for at most the deadline.
The model's own template is trusted and rendered by the tokenizer, unbounded.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from datetime import datetime
from typing import Any, Callable

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pagedserve.errors import ValidationError

RENDER_DEADLINE_S = 2.0
MAX_RENDERED_CHARS = 4 << 20
MAX_RANGE = 100_000
MAX_TEMPLATE_CHARS = 256 << 10


class _TemplateBoundExceeded(Exception):
    pass


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus size checks on `*` and `**` (one C call each, invisible to the tracer)."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int) \
                        and len(seq) * count > MAX_RENDERED_CHARS:
                    raise _TemplateBoundExceeded(f"a repetition of {len(seq)} x {count} items is too large")
            return left * right
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                and right * max(abs(left).bit_length(), 1) > 64 * 1024:
            raise _TemplateBoundExceeded(f"{left} ** {right} is too large")
        return left ** right


def _bounded_range(*args: int) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise _TemplateBoundExceeded(f"range() of {len(numbers)} items is larger than {MAX_RANGE}")
    return numbers


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, range=_bounded_range,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


def _deadline_tracer(deadline: float) -> Callable:
    def trace(frame: Any, event: str, arg: Any) -> Callable:
        if time.monotonic() > deadline:
            raise _TemplateBoundExceeded(f"rendering took longer than {RENDER_DEADLINE_S} s")
        return trace
    return trace


def render_untrusted_template(source: str, conversation: list[dict[str, Any]], add_generation_prompt: bool,
                              continue_final_message: bool, special_tokens: dict[str, Any],
                              deadline_s: float = RENDER_DEADLINE_S, tools: list[dict] | None = None,
                              variables: dict[str, Any] | None = None) -> str:
    """Render a request's chat template; raises ValidationError("chat_template") past a bound
    or on any template error. Installs (and removes) a trace function in the calling thread."""
    if not isinstance(source, str) or len(source) > MAX_TEMPLATE_CHARS:
        raise ValidationError(f"chat_template must be a string of at most {MAX_TEMPLATE_CHARS} characters",
                              "chat_template")
    previous = sys.gettrace()
    sys.settrace(_deadline_tracer(time.monotonic() + deadline_s))
    try:
        template = _compile(source)
        pieces, size = [], 0
        context = {**special_tokens, **(variables or {}), "messages": conversation,
                   "add_generation_prompt": add_generation_prompt, "tools": tools}
        for piece in template.generate(**context):
            size += len(piece)
            if size > MAX_RENDERED_CHARS:
                raise _TemplateBoundExceeded(f"the rendered prompt is longer than {MAX_RENDERED_CHARS} characters")
            pieces.append(piece)
        rendered = "".join(pieces)
    except _TemplateBoundExceeded as exc:
        raise ValidationError(f"the chat template exceeds a bound: {exc}", "chat_template") from None
    except (jinja2.TemplateError, ValueError, TypeError, OverflowError, AttributeError, KeyError, IndexError,
            ZeroDivisionError, RecursionError, MemoryError) as exc:
        raise ValidationError(f"cannot apply the chat template: {type(exc).__name__}: {exc}",
                              "chat_template") from None
    finally:
        sys.settrace(previous)
    if continue_final_message:
        final = str(conversation[-1].get("content", "")).strip()
        end = rendered.rfind(final) if final else -1
        if end < 0:
            raise ValidationError("continue_final_message: the final message is not in the rendered prompt",
                                  "continue_final_message")
        rendered = rendered[:end + len(final)]
    return rendered
