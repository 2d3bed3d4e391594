"""vLLM's bad_words on the runner: which tokens a request may not sample at this step.

The input processor turns the words into token sequences (SamplingParams.bad_words_token_ids).
A sequence of one token bans it at every step; a longer one bans its last token at a step whose
latest output tokens are the rest of it. As in vLLM, only the output is matched, never the prompt:
a sequence whose first tokens end the prompt does not ban its last token at the first step.
With async scheduling a row's latest token may still be on the device (its -1 placeholder) when
the row is sampled: a sequence whose earlier tokens match then bans its last token on the
condition that the pending token is the one before it (the sampler checks on the device), so a
request with bad words never holds the engine in lockstep.
"""
from __future__ import annotations


class BadWords:
    """A request's banned token sequences, grouped for a step's look-up: one tuple and one dict
    probe per distinct prefix length, however many sequences there are."""

    __slots__ = ("always", "by_prefix", "by_head")

    def __init__(self, sequences: list[list[int]]) -> None:
        always: set[int] = set()
        by_prefix: dict[int, dict[tuple[int, ...], list[int]]] = {}
        by_head: dict[int, dict[tuple[int, ...], list[tuple[int, int]]]] = {}
        for ids in sequences:
            if len(ids) == 1:
                always.add(ids[0])
            elif ids:
                by_prefix.setdefault(len(ids) - 1, {}).setdefault(tuple(ids[:-1]), []).append(ids[-1])
                # the prefix less its last token -> (that token, the banned one)
                by_head.setdefault(len(ids) - 1, {}).setdefault(tuple(ids[:-2]), []).append((ids[-2], ids[-1]))
        self.always = sorted(always)
        self.by_prefix = by_prefix
        self.by_head = by_head

    def banned(self, token_ids: list[int], num_prompt_tokens: int) -> tuple[list[int], list[tuple[int, int]]]:
        """After `token_ids` (prompt, then the outputs so far, the last of them maybe a -1
        placeholder): the tokens banned (may repeat one), and the (token, condition) pairs
        banned only if the placeholder's token turns out to be `condition`."""
        banned = self.always
        num_outputs = len(token_ids) - num_prompt_tokens
        if num_outputs and token_ids[-1] == -1:
            conditional = []
            for length, heads in self.by_head.items():
                if length <= num_outputs:
                    hit = heads.get(tuple(token_ids[len(token_ids) - length:-1]))
                    if hit is not None:
                        conditional += [(last, condition) for condition, last in hit]
            return banned, conditional
        for length, last_tokens in self.by_prefix.items():
            if length <= num_outputs:
                hit = last_tokens.get(tuple(token_ids[-length:]))
                if hit is not None:
                    banned = banned + hit
        return banned, []
