"""vLLM's reasoning parsers (`--reasoning-parser`): a reasoning model's chain of thought, written
between <think> and </think>, is returned apart from its answer, as the message's `reasoning`
(and `reasoning_content`, its older name, for clients that read that), `content` the rest.

    deepseek_r1   everything before </think> is reasoning (the <think> itself is optional: R1's
                  chat template opens it in the prompt); no </think> yet: all of it is reasoning
    qwen3         reasoning only inside <think> ... </think> at the start of the output (as Qwen3
                  writes it); an output without that opening <think> is all content (thinking off);
                  a <think> never closed is all reasoning (the output stopped while thinking)

`split` parses a whole text; `ReasoningStream` the same text as it streams, holding back a tail
that may be the start of a tag (the parts it sends are exactly `split`'s)."""
from __future__ import annotations

from typing import Any

START, END = "<think>", "</think>"
REASONING_PARSERS = ("deepseek_r1", "qwen3")


def split(text: str, parser: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole output; None for a part that is empty."""
    opened = text.startswith(START)
    if parser == "qwen3" and not opened:
        return None, text or None
    body = text[len(START):] if opened else text
    end = body.find(END)
    if end < 0:
        return body or None, None
    return body[:end] or None, body[end + len(END):] or None


def message_fields(reasoning: str | None) -> dict[str, Any]:
    return {"reasoning": reasoning, "reasoning_content": reasoning}


class ReasoningStream:
    """One choice's deltas -> [("reasoning" | "content", text)], in order; the text of each kind
    adds up to `split`'s part of the whole output once `finish` has been fed."""

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.pending = ""        # text not yet sent (it may end in part of a tag)
        self.state = "start"     # start (a <think> may come), reasoning, content

    def feed(self, text: str, finished: bool = False) -> list[tuple[str, str]]:
        self.pending += text
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                if self.pending.startswith(START):
                    self.pending = self.pending[len(START):]
                    self.state = "reasoning"
                    continue
                if START.startswith(self.pending) and not finished:
                    return out   # could still become <think>
                # no <think>: R1 is already reasoning; Qwen3 is not thinking (all content)
                self.state = "reasoning" if self.parser == "deepseek_r1" else "content"
                continue
            if self.state == "reasoning":
                end = self.pending.find(END)
                if end >= 0:
                    out.append(("reasoning", self.pending[:end]))
                    self.pending = self.pending[end + len(END):]
                    self.state = "content"
                    continue
                keep = 0 if finished else _partial_tail(self.pending, END)
                send, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
                out.append(("reasoning", send))
                return [(kind, part) for kind, part in out if part]
            out.append(("content", self.pending))
            self.pending = ""
            return [(kind, part) for kind, part in out if part]


def _partial_tail(text: str, tag: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
