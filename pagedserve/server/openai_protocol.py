"""OpenAI request bodies (with vLLM's extras) as pydantic models, and their translation to
SamplingParams. Unknown fields are a 400 naming the field; known fields we do not support
are accepted only at their neutral value, otherwise a 400 naming them."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pagedserve.errors import ValidationError
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams
from pagedserve.server import structured
from pagedserve.server.tool_calls import ToolPlan, check_history_tool_calls, check_tools, resolve_tool_choice

_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1

# H2 (issue 16): caps on request sizes, each named in its 400 (README "Limits")
MAX_PROMPTS_PER_REQUEST = 128     # entries of a completions `prompt` list
MAX_STOP_STRINGS = 32             # OpenAI documents 4; vLLM has no cap
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS_ENTRIES = 1024


class _Strict(BaseModel):
    """Unknown fields are errors; numbers are strict (a bool is not an int, "2" and 2.0 are
    not ints) and finite (Infinity and NaN, which Python's JSON reader accepts, are not)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = False   # OpenAI's and vLLM's default: no usage chunk
    continuous_usage_stats: bool | None = False


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    n: int | None = 1
    presence_penalty: float | None = 0.0
    seed: int | None = Field(None, ge=_LONG_MIN, le=_LONG_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # vLLM extras
    best_of: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None   # prompt_token_ids / token_ids in the response (vLLM)
    request_id: str | None = None
    cache_salt: str | None = None   # salts this request's prefix-cache hashes
    # vLLM extras (those in UNSUPPORTED accepted only at their neutral value)
    use_beam_search: bool = False   # n beams (server/beam.py)
    length_penalty: float = 1.0
    priority: int = 0   # scheduling policy "priority": lower runs first (else only 0; frontend/input_processor.py)
    truncate_prompt_tokens: int | None = None   # keep the last k prompt tokens (-1: max_model_len)
    allowed_token_ids: list[int] | None = None   # only these tokens may be sampled
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None   # accepted and ignored (one backend: xgrammar)
    guided_whitespace_pattern: str | None = None
    structured_outputs: Any = None
    response_format: dict[str, Any] | None = None
    logits_processors: Any = None
    kv_transfer_params: Any = None
    vllm_xargs: Any = None
    early_stopping: bool = False   # vLLM's beam-search option: only its default (UNSUPPORTED)
    bad_words: list[str] | None = None   # vLLM's: words never generated (SamplingParams.bad_words)

    def check_supported(self) -> None:
        for name, neutral in UNSUPPORTED.items():
            if hasattr(self, name) and getattr(self, name) not in neutral:
                why = UNSUPPORTED_WHY.get(name)
                raise ValidationError(f"{name} is not supported by this server" + (f": {why}" if why else ""), name)
        self.structured_constraint()   # structured-output fields: a 400 naming the field (structured.py)
        if self.length_penalty != 1.0 and not self.use_beam_search:
            raise ValidationError("length_penalty only applies with use_beam_search", "length_penalty")
        if self.cache_salt is not None and not self.cache_salt:
            raise ValidationError("cache_salt must be a non-empty string if given", "cache_salt")
        if self.stream_options is not None and not self.stream:
            raise ValidationError("stream_options can only be set when stream is true", "stream_options")
        if self.stream and self.best_of is not None and self.best_of > (self.n or 1):
            raise ValidationError("best_of > n cannot be streamed", "best_of")
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Caps on lists a client could make arbitrarily long (H2, issue 16 item 5)."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise ValidationError(f"stop supports up to {MAX_STOP_STRINGS} strings; given {len(stop)}", "stop")
        if self.stop_token_ids is not None and len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValidationError(f"stop_token_ids supports up to {MAX_STOP_TOKEN_IDS} ids; given "
                                  f"{len(self.stop_token_ids)}", "stop_token_ids")
        if self.logit_bias is not None and len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValidationError(f"logit_bias supports up to {MAX_LOGIT_BIAS_ENTRIES} entries; given "
                                  f"{len(self.logit_bias)}", "logit_bias")
        prompt = getattr(self, "prompt", None)
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) \
                and len(prompt) > MAX_PROMPTS_PER_REQUEST:
            raise ValidationError(f"prompt supports up to {MAX_PROMPTS_PER_REQUEST} prompts per request; given "
                                  f"{len(prompt)}", "prompt")

    def engine_prompt(self, prompt: str | list[int]) -> str | list[int] | dict[str, Any]:
        """A prompt as the engine takes it: a dict carrying cache_salt when one is given."""
        if self.cache_salt is None:
            return prompt
        return {"prompt" if isinstance(prompt, str) else "prompt_token_ids": prompt, "cache_salt": self.cache_salt}

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=1 if self.n is None else self.n, best_of=self.best_of,
            presence_penalty=_or(self.presence_penalty, 0.0), frequency_penalty=_or(self.frequency_penalty, 0.0),
            repetition_penalty=_or(self.repetition_penalty, 1.0), temperature=_or(self.temperature, 1.0),
            top_p=_or(self.top_p, 1.0), top_k=_or(self.top_k, 0), min_p=_or(self.min_p, 0.0), seed=self.seed,
            stop=self.stop, stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output, ignore_eos=self.ignore_eos,
            max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            logit_bias=_logit_bias(self.logit_bias), allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words, structured_outputs=self.structured_params())

    def structured_constraint(self) -> structured.Constraint | None:
        """The request's one structured-output constraint (response_format, structured_outputs
        or guided_*) and the field it came from; ValidationError naming the field."""
        return structured.from_openai(self)

    def structured_params(self) -> StructuredOutputsParams | None:
        constraint = self.structured_constraint()
        return None if constraint is None else constraint.params


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]


def effort_template_kwargs(effort: str | None) -> dict[str, Any]:
    """OpenAI's reasoning effort as vLLM hands it to the chat template: `reasoning_effort`, and
    `enable_thinking` false for "none", else true. A template that reads neither (a model that
    does not reason) renders the same prompt."""
    return {} if effort is None else {"reasoning_effort": effort, "enable_thinking": effort != "none"}


# Fields accepted only at these values (their default, or an explicit "off").
UNSUPPORTED: dict[str, tuple] = {
    "guided_whitespace_pattern": (None,), "logits_processors": (None,),
    "kv_transfer_params": (None,), "vllm_xargs": (None,), "suffix": (None, ""),
    # OpenAI chat fields that would change the output: accepted only when off (H3, issue 16 #13)
    "verbosity": (None,), "web_search_options": (None,), "audio": (None,),
    "modalities": (None, ["text"]), "functions": (None, []), "function_call": (None, "none", "auto"),
    # vLLM extras accepted at their default only
    "early_stopping": (False,), "mm_processor_kwargs": (None, {}),
}

# Why a field of UNSUPPORTED is refused, where its name does not say it (added to the 400's message).
UNSUPPORTED_WHY: dict[str, str] = {
    "early_stopping": "beam search runs each beam to max_tokens or its end-of-sequence token (vLLM's beam "
                      "search; only false is accepted)",
    "mm_processor_kwargs": "the model takes text only (only null or {} is accepted)",
}

# OpenAI spec fields accepted and ignored (they do not change the output); a warning is logged.
IGNORED_FIELDS = ("store", "metadata", "service_tier", "user", "prompt_cache_key", "safety_identifier",
                  "prediction", "parallel_tool_calls")


def ignored_fields_set(request: BaseModel) -> list[str]:
    """The accepted-and-ignored fields this request set (to anything but null)."""
    return [name for name in IGNORED_FIELDS if getattr(request, name, None) is not None]


def check_truncate_prompt_tokens(value: int | None, max_model_len: int) -> int | None:
    """vLLM's rule: -1 (max_model_len) or 1..max_model_len; the number of tokens to keep."""
    if value is None:
        return None
    if value == -1:
        return max_model_len
    if value < 1 or value > max_model_len:
        raise ValidationError(f"truncate_prompt_tokens must be -1 or between 1 and max_model_len "
                              f"({max_model_len}), got {value}", "truncate_prompt_tokens")
    return value


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool | None = False
    logprobs: int | None = None
    max_tokens: int | None = 16
    suffix: str | None = None
    add_special_tokens: bool = True

    @property
    def echo_without_generation(self) -> bool:
        """`echo` with max_tokens 0 (OpenAI's legacy API, vLLM): the prompt (and its logprobs)
        back, nothing generated. The engine runs one token, which the route leaves out."""
        return bool(self.echo) and self.max_tokens == 0

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo_without_generation and self.use_beam_search:
            raise ValidationError("max_tokens 0 (echo without generation) cannot be used with use_beam_search",
                                  "max_tokens")

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of engine prompts (text or token ids)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ValidationError("prompt must not be empty", "prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]   # type: ignore[arg-type]
        return list(prompt)   # type: ignore[arg-type]

    def to_sampling_params(self) -> SamplingParams:
        params = self.sampling_params(1 if self.echo_without_generation else self.max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None and params.prompt_logprobs is None:
            params.prompt_logprobs = self.logprobs   # echoed prompt tokens carry logprobs too
        return params


# Content part types of OpenAI's and vLLM's chat API that carry media: a 400 saying the model
# takes text only (vLLM answers them on a multimodal model; OpenAI's API, on a vision model).
MEDIA_PART_TYPES = frozenset({"image_url", "input_image", "image_pil", "image_embeds", "input_audio", "audio_url",
                              "audio_embeds", "video_url", "video_embeds", "file", "input_file", "prompt_embeds"})


class TextContentPart(_Strict):
    """A chat content part: only {"type": "text", "text": str}; any other type is a 400 naming
    the part (messages.i.content.j) and its type."""

    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if isinstance(kind, str) and kind != "text":
            shown = kind if len(kind) <= 64 else kind[:64] + "..."
            why = "this model takes text only" if kind in MEDIA_PART_TYPES else "only 'text' parts are"
            raise PydanticCustomError("content_part_type", "content part type '{kind}' is not supported ({why})",
                                      {"kind": shown, "why": why})
        return value


def _content_kind(value: Any) -> str:
    """Which member of ChatMessage.content to validate against (errors name only that one)."""
    return "list[TextContentPart]" if isinstance(value, list) else "str"


class ChatMessage(_Strict):
    role: str
    # A callable discriminator: a list is checked only as content parts (its error names the
    # part), anything else only as a string; the tags hold "[" or are "str", so the parser
    # leaves them out of the field's name.
    content: Annotated[Union[Annotated[str, Tag("str")],
                             Annotated[list[TextContentPart], Tag("list[TextContentPart]")]],
                       Discriminator(_content_kind)] | None = None
    name: str | None = None
    # OpenAI spec fields of earlier turns: accepted when they hold nothing (H3, issue 16 #13)
    refusal: None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    audio: None = None
    function_call: None = None

    @field_validator("role")
    @classmethod
    def _role_named(cls, role: str) -> str:
        if not role.strip():
            raise PydanticCustomError("role", "must be a non-empty string (such as 'system', 'user', 'assistant' "
                                      "or 'tool')")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, content: Any) -> Any:
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise PydanticCustomError("content_type", "must be a string or a list of content parts "
                                      "({\"type\": \"text\", \"text\": ...})")
        if not content:   # OpenAI's 400 too (an array needs one item)
            raise PydanticCustomError("empty_array", "empty array: content must be a string or a list of at "
                                      "least one content part")
        return content

    def as_template_message(self, position: int = 0) -> dict[str, Any]:
        """The message as given; the frontend's render_chat flattens content parts (the
        same function LLM.chat uses, so online and offline prompts are the same). An
        assistant turn's tool_calls reach the template with their arguments as dicts (the HF
        convention, as vLLM passes them); a "tool" message keeps its tool_call_id."""
        message = self.model_dump(exclude_none=True, exclude={"refusal", "tool_calls", "audio", "function_call"})
        if self.tool_calls:
            message["tool_calls"] = check_history_tool_calls(self.tool_calls, position)
        return message

    def text(self) -> str:
        """The content as one string (parts joined with newlines, as vLLM's echo)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # OpenAI spec fields: ignored (IGNORED_FIELDS) or accepted only when off (UNSUPPORTED)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None   # reaches the chat template (effort_template_kwargs)
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    # vLLM extras
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None   # vLLM's: only null or {} (text only; UNSUPPORTED)

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise ValidationError("messages must not be empty", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValidationError("top_logprobs needs logprobs set to true", "top_logprobs")
        check_tools(self.tools)   # tool_choice needs the server's flags: checked in tool_plan()
        if self.continue_final_message and self.add_generation_prompt:
            raise ValidationError("continue_final_message and add_generation_prompt cannot both be true",
                                  "continue_final_message")

    def tool_plan(self, enable_auto_tool_choice: bool, tool_call_parser: str | None) -> ToolPlan:
        """tools + tool_choice under the server's flags (tool_calls.py); a 400 naming the field."""
        return resolve_tool_choice(check_tools(self.tools), self.tool_choice, enable_auto_tool_choice,
                                   tool_call_parser)

    def to_sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    try:
        return {int(token): float(value) for token, value in bias.items()}
    except ValueError:
        raise ValidationError("logit_bias keys must be token ids", "logit_bias") from None
