"""What every route needs: the engine, the server's settings, and small shared helpers
(model-name check, response ids, token strings)."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from pagedserve.errors import ValidationError
from pagedserve.frontend.async_engine import AsyncEngine
from pagedserve.outputs import Logprob

DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 2**20


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    model_root: str | None = None       # what /v1/models reports as `root`
    api_key: str | None = None          # None: no authentication
    chat_template: str | None = None    # overrides the tokenizer's template
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES


@dataclass
class ServerContext:
    engine: AsyncEngine
    settings: ServerSettings
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name

    def check_model(self, model: str | None) -> None:
        """An absent model means the served one; any other name is a 400 naming `model`."""
        if model is not None and model != self.model_name:
            raise ValidationError(f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                                  "model")

    def token_str(self, token_id: int, logprob: Logprob | None = None, as_token_id: bool = False) -> str:
        """A token as OpenAI logprobs show it: its own decoded text, or `token_id:N`."""
        if as_token_id:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.engine.tokenizer.decode([token_id])

    def decode(self, token_ids: list[int]) -> str:
        return self.engine.tokenizer.decode(token_ids)


def new_request_id(prefix: str, requested: str | None = None) -> tuple[str, str]:
    """(response id shown to the client, engine request id, unique even if `requested` is not)."""
    unique = uuid.uuid4().hex
    return f"{prefix}-{requested or unique}", f"{prefix}-{unique}"
