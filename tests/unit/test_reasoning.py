"""Reasoning parsers (server/reasoning.py): exact (reasoning, content) of whole outputs for both
parsers, and a stream fed in every way of cutting the text into pieces gives the same parts, with
no part of a tag ever sent."""
from __future__ import annotations

import random

import pytest

from pagedserve.server.reasoning import ReasoningStream, split

CASES = [  # text, deepseek_r1's (reasoning, content), qwen3's
    ("<think>a < b</think>The answer", ("a < b", "The answer"), ("a < b", "The answer")),
    ("step one</think>\n\nParis", ("step one", "\n\nParis"), (None, "step one</think>\n\nParis")),
    ("<think>still thinking", ("still thinking", None), ("still thinking", None)),
    ("no tags at all", ("no tags at all", None), (None, "no tags at all")),
    ("<think></think>only content", (None, "only content"), (None, "only content")),
    ("<thin", ("<thin", None), (None, "<thin")),
    ("", (None, None), (None, None)),
    ("<think>x</think>y</think>z", ("x", "y</think>z"), ("x", "y</think>z")),
]


@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
def test_split_and_every_streaming_cut_agree(parser: str) -> None:
    rng = random.Random(3)
    for text, r1, qwen3 in CASES:
        want = r1 if parser == "deepseek_r1" else qwen3
        assert split(text, parser) == want, text
        for _ in range(40):
            cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(0, max(0, len(text) - 1)))) if len(text) > 1 \
                else []
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            stream, sent = ReasoningStream(parser), {"reasoning": "", "content": ""}
            for i, piece in enumerate(pieces):
                for kind, part in stream.feed(piece, finished=i == len(pieces) - 1):
                    assert part and "<think>" not in part or kind == "content", (text, pieces)
                    sent[kind] += part
            if not pieces:
                stream.feed("", finished=True)
            assert (sent["reasoning"] or None, sent["content"] or None) == want, (text, pieces)


def test_reasoning_is_sent_as_it_comes() -> None:
    stream = ReasoningStream("deepseek_r1")
    assert stream.feed("<think>Let me") == [("reasoning", "Let me")]
    assert stream.feed(" see.</th") == [("reasoning", " see.")]   # "</th" may begin the end tag
    assert stream.feed("ink>Paris") == [("content", "Paris")]
    assert ReasoningStream("qwen3").feed("Paris is") == [("content", "Paris is")]   # thinking off: at once
