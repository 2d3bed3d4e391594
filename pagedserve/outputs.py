"""What the offline API returns, shaped like vLLM's RequestOutput / CompletionOutput, and the
map from engine finish reasons ("stop", "length", "abort"; the OpenAI vocabulary as is) to TGI's."""
from __future__ import annotations

from dataclasses import dataclass, field


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
    metrics: dict[str, float] = field(default_factory=dict)   # "arrival_time", "first_token_time"
    error: str | None = None   # why the engine failed this request (its finish_reason is "abort")
    error_param: str | None = None   # the request's own parameter that caused that failure, if one did


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    """vLLM's EmbeddingRequestOutput: `outputs.embedding` is the prompt's vector."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class ClassificationOutput:
    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ClassificationRequestOutput:
    """vLLM's ClassificationRequestOutput: `outputs.probs`, one per class."""

    request_id: str
    outputs: ClassificationOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class ScoringOutput:
    score: float


@dataclass
class ScoringRequestOutput:
    """vLLM's ScoringRequestOutput: `outputs.score` is the pair's score."""

    request_id: str
    outputs: ScoringOutput
    finished: bool = True


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
