"""What the offline API returns, shaped like vLLM's RequestOutput / CompletionOutput, and the
one table that maps engine finish reasons to the OpenAI and TGI vocabularies."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    """Why a sequence ended. STOP covers EOS, stop token ids and stop strings."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"

    def __str__(self) -> str:
        return self.value


# Logprobs: one dict per position, token id -> Logprob (vLLM's layout).
@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def openai_finish_reason(reason: str | None) -> str | None:
    """Engine reason -> OpenAI finish_reason ("stop", "length", "abort")."""
    return reason


def tgi_finish_reason(reason: str | None, stop_reason: int | str | None) -> str | None:
    """Engine reason -> TGI finish_reason ("eos_token", "stop_sequence", "length")."""
    if reason is None:
        return None
    if reason == "length":
        return "length"
    if reason == "stop" and isinstance(stop_reason, str):
        return "stop_sequence"
    if reason == "stop":
        return "eos_token"
    return "length" if reason == "abort" else reason
