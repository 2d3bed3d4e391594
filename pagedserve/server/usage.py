"""The `usage` object of OpenAI responses, counted as outputs arrive."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Usage:
    prompt_tokens_by_prompt: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0

    def add_prompt(self, prompt_index: int, num_tokens: int) -> None:
        """Idempotent per prompt: every output of a prompt repeats its token ids."""
        self.prompt_tokens_by_prompt[prompt_index] = num_tokens

    def add_completion(self, num_tokens: int) -> None:
        self.completion_tokens += num_tokens

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt_tokens_by_prompt.values())

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens + self.completion_tokens,
                "completion_tokens": self.completion_tokens}
