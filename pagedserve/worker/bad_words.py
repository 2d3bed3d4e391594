"""vLLM's bad_words on the runner: which tokens a request may not sample at this step.

The input processor turns the words into token sequences (SamplingParams.bad_words_token_ids).
A sequence of one token bans it at every step; a longer one bans its last token at a step whose
latest output tokens are the rest of it. As in vLLM, only the output is matched, never the prompt:
a sequence whose first tokens end the prompt does not ban its last token at the first step.
A request with sequences of several tokens reads its output history, so the engine keeps its
steps in lockstep (SamplingParams.reads_output_history): its tokens are on the host, never a
placeholder, when its row is sampled.
"""
from __future__ import annotations


class BadWords:
    """A request's banned token sequences, grouped for a step's look-up: one tuple and one dict
    probe per distinct prefix length, however many sequences there are."""

    __slots__ = ("always", "by_prefix")

    def __init__(self, sequences: list[list[int]]) -> None:
        always: set[int] = set()
        by_prefix: dict[int, dict[tuple[int, ...], list[int]]] = {}
        for ids in sequences:
            if len(ids) == 1:
                always.add(ids[0])
            elif ids:
                by_prefix.setdefault(len(ids) - 1, {}).setdefault(tuple(ids[:-1]), []).append(ids[-1])
        self.always = sorted(always)
        self.by_prefix = by_prefix

    def banned(self, token_ids: list[int], num_prompt_tokens: int) -> list[int]:
        """The tokens banned after `token_ids` (prompt, then the outputs so far); may repeat one."""
        banned = self.always
        num_outputs = len(token_ids) - num_prompt_tokens
        for length, last_tokens in self.by_prefix.items():
            if length <= num_outputs:
                hit = last_tokens.get(tuple(token_ids[-length:]))
                if hit is not None:
                    banned = banned + hit
        return banned
