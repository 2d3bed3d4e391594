"""Boundary validation: prompts and sampling parameters become Requests or a
ValidationError naming the parameter. Also renders chat templates."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Union

import jinja2

from pagedserve.core.request import Request
from pagedserve.engine_io import RequestId
from pagedserve.frontend.chat_template import render_untrusted_template
from pagedserve.errors import ValidationError
from pagedserve.frontend.prompt_bound import prompt_length_bound
from pagedserve.sampling_params import SamplingParams

PromptType = Union[str, dict, list[int]]
MAX_LOGPROBS = 20
MAX_BAD_WORD_SEQUENCES = 128        # token sequences a request's bad_words make (vLLM's VLLM_MAX_NUM_BAD_WORDS)
MAX_BAD_WORD_TOKENS = 1024          # their tokens together (vLLM's VLLM_MAX_BAD_WORDS_TOTAL_TOKENS)


@dataclass
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]
    cache_salt: str | None = None   # prompts with different salts never share prefix-cache blocks


class InputProcessor:
    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int,
                 eos_token_ids: tuple[int, ...], max_logprobs: int = MAX_LOGPROBS,
                 max_num_seqs: int = 2**31, priority_scheduling: bool = False) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.max_logprobs = max_logprobs   # -1: no cap
        self.max_num_seqs = max_num_seqs   # n and best_of are capped by it
        self.priority_scheduling = priority_scheduling   # scheduling policy "priority": requests carry one

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """The most characters one token of the tokenizer's vocabulary can stand for (its longest
        entry's length: byte-level and SentencePiece entries are at least as long as their text)."""
        vocab = getattr(self.tokenizer, "get_vocab", None)   # every Hugging Face tokenizer has one
        return max(map(len, vocab()), default=1) if vocab is not None else 1 << 16

    def process_prompt(self, prompt: PromptType, add_special_tokens: bool = True) -> ProcessedPrompt:
        """A string, a token id list, or a dict (vLLM's TextPrompt / TokensPrompt): "prompt" or
        "prompt_token_ids", and optionally "cache_salt"."""
        salt = None
        if isinstance(prompt, dict):
            salt = prompt.get("cache_salt")
            if salt is not None and (not isinstance(salt, str) or not salt):
                raise ValidationError("cache_salt must be a non-empty string", "cache_salt")
            if "prompt_token_ids" in prompt:
                ids = list(prompt["prompt_token_ids"])
                return ProcessedPrompt(prompt.get("prompt"), self._check_ids(ids), salt)
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValidationError("a prompt dict needs 'prompt' or 'prompt_token_ids'", "prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return ProcessedPrompt(None, self._check_ids(list(prompt)), salt)
        if not isinstance(prompt, str):
            raise ValidationError(f"prompt must be a string, a token id list or a dict, got {type(prompt).__name__}",
                                  "prompt")
        if self.tokenizer is None:
            raise ValidationError("text prompts need a tokenizer (skip_tokenizer_init=True): pass prompt_token_ids",
                                  "prompt")
        if prompt == "":
            raise ValidationError("prompt must not be empty", "prompt")
        self.check_text_length(prompt)
        ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return ProcessedPrompt(prompt, self._check_ids(ids), salt)

    def check_text_length(self, text: str, param: str = "prompt") -> None:
        """A text that surely makes max_model_len tokens or more is refused before it is tokenized
        whole (PromptLengthBound: from its length or a prefix's tokens; a 15 MB prompt took an
        input thread 13-33 s to reach the same 400). A text that may fit passes."""
        found = prompt_length_bound(self.tokenizer).at_least(text, self.max_model_len)
        if found is not None:
            raise ValidationError(
                f"the prompt is at least {found.tokens} tokens long ({found.reason}); max_model_len is "
                f"{self.max_model_len} and at least one token must be generated", param)

    def _check_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ValidationError("prompt must not be empty", "prompt")
        bad = next((t for t in ids if not isinstance(t, int) or t < 0 or t >= self.vocab_size), None)
        if bad is not None:
            raise ValidationError(f"token id {bad} is out of vocabulary (size {self.vocab_size})", "prompt")
        if len(ids) >= self.max_model_len:
            raise ValidationError(
                f"the prompt is {len(ids)} tokens long; max_model_len is {self.max_model_len} and at least "
                f"one token must be generated", "prompt")
        return ids

    def check_params(self, params: SamplingParams, num_prompt_tokens: int, strict_length: bool = False) -> int:
        """Validate what depends on the model or the engine's limits; returns the effective
        max_tokens. Every check runs whatever else is missing (max_tokens None included). With
        strict_length, a prompt plus max_tokens beyond max_model_len is an error (OpenAI
        server); otherwise generation just stops at max_model_len (vLLM's offline API)."""
        for name in ("n", "best_of"):
            value = getattr(params, name)
            if value is not None and value > self.max_num_seqs:
                raise ValidationError(f"{name} must be at most {self.max_num_seqs} (max_num_seqs), got {value}", name)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is None:
                continue
            wanted = self.vocab_size if value == -1 else value
            if self.max_logprobs != -1 and wanted > self.max_logprobs:
                raise ValidationError(f"{name} must be at most {self.max_logprobs} (max_logprobs), got {value}", name)
        for name, tokens in (("logit_bias", list(params.logit_bias or {})), ("stop_token_ids", params.stop_token_ids),
                             ("allowed_token_ids", params.allowed_token_ids or [])):
            bad = next((t for t in tokens if t >= self.vocab_size), None)
            if bad is not None:
                raise ValidationError(f"{name}: token id {bad} is out of vocabulary (size {self.vocab_size})", name)
        if params.allowed_token_ids is not None and params.structured_outputs is not None:
            # two token masks whose intersection may be empty at any step: nothing left to sample
            raise ValidationError("allowed_token_ids cannot be combined with a structured-outputs constraint "
                                  "(response_format, structured_outputs, guided_*, tool_choice)", "allowed_token_ids")
        if not params.detokenize and params.stop:
            raise ValidationError("stop strings need detokenize=True", "stop")
        room = self.max_model_len - num_prompt_tokens
        if params.max_tokens is None:
            return room
        if strict_length and params.max_tokens > room:
            raise self._too_long(num_prompt_tokens, params.max_tokens)
        return min(params.max_tokens, room)

    def _too_long(self, num_prompt_tokens: int, max_tokens: int) -> ValidationError:
        return ValidationError(
            f"this model's maximum context length is {self.max_model_len} tokens; the request asks for "
            f"{num_prompt_tokens + max_tokens} ({num_prompt_tokens} in the prompt, {max_tokens} in max_tokens)",
            "max_tokens")

    def check_beam_search(self, num_prompt_tokens: int, beam_width: int, max_tokens: int,
                          width_param: str = "beam_width") -> None:
        """A beam search's limits: its 2 * width logprobs a step within max_logprobs (the error
        names `width_param`: n on the OpenAI routes), its beams within max_model_len."""
        if self.max_logprobs != -1 and 2 * beam_width > self.max_logprobs:
            raise ValidationError(f"a beam search of width {beam_width} asks for {2 * beam_width} logprobs a step; "
                                  f"the engine allows {self.max_logprobs} (max_logprobs): width at most "
                                  f"{self.max_logprobs // 2}", width_param)
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise self._too_long(num_prompt_tokens, max_tokens)

    def resolve_params(self, params: SamplingParams) -> SamplingParams:
        """logprobs / prompt_logprobs of -1 mean the whole vocabulary (a copy is returned)."""
        if params.logprobs != -1 and params.prompt_logprobs != -1:
            return params
        params = params.clone()
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(params, name) == -1:
                setattr(params, name, self.vocab_size)
        return params

    def bad_words_token_ids(self, bad_words: list[str]) -> list[list[int]]:
        """vLLM's tokenization of bad_words (SamplingParams.update_from_tokenizer): each word,
        leading spaces stripped, without special tokens; then with one leading space, kept if
        that gives as many tokens and another first token (a word-start variant: " Paris"
        beside "Paris"). A word of no tokens, too many sequences or tokens, or an id past the
        model's vocabulary is a ValidationError naming bad_words."""
        if self.tokenizer is None:
            raise ValidationError("bad_words need a tokenizer (skip_tokenizer_init=True)", "bad_words")
        # no token spans more characters than the vocabulary's longest entry: words longer together
        # than the token limit can cover are refused before tokenizing them (a 15 MB word took ~20 s
        # of an input thread, twice, to reach the same 400)
        chars = sum(len(word.lstrip()) + 1 for word in bad_words)
        if chars > MAX_BAD_WORD_TOKENS * self.longest_token_chars:
            raise ValidationError(f"bad_words are {chars} characters long: more than {MAX_BAD_WORD_TOKENS} tokens "
                                  "can hold", "bad_words")
        sequences: list[list[int]] = []
        num_tokens = 0
        for word in bad_words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            if not plain:
                raise ValidationError(f"bad_words entries must tokenize to at least one token; {word!r:.80} "
                                      "gives none", "bad_words")
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            for ids in (plain, spaced) if len(spaced) == len(plain) and spaced[0] != plain[0] else (plain,):
                sequences.append(list(ids))
                num_tokens += len(ids)
                if len(sequences) > MAX_BAD_WORD_SEQUENCES or num_tokens > MAX_BAD_WORD_TOKENS:
                    raise ValidationError(f"bad_words make more than {MAX_BAD_WORD_SEQUENCES} token sequences or "
                                          f"{MAX_BAD_WORD_TOKENS} tokens (each word counts once, or twice with "
                                          "its leading-space form)", "bad_words")
        bad = next((t for ids in sequences for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValidationError(f"bad_words: token id {bad} is out of vocabulary (size {self.vocab_size})",
                                  "bad_words")
        return sequences

    def make_requests(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                      strict_length: bool = False, priority: int = 0) -> tuple[Request, list[Request]]:
        """The request and, for n > 1 (or best_of), its siblings to fork after the prefill."""
        self.check_priority(priority)
        max_tokens = self.check_params(params, len(prompt.prompt_token_ids), strict_length)
        params = self.resolve_params(params)
        if params.bad_words:   # tokenized on a copy (the caller's params may serve other prompts)
            params = params.clone()
            params._bad_words_token_ids = self.bad_words_token_ids(params.bad_words)
        num_seqs = max(params.n, params.best_of or 1)
        requests = []
        for index in range(num_seqs):
            child_params = params
            if num_seqs > 1:
                child_params = params.clone()
                if params.seed is not None:   # stays in torch's seed range
                    child_params.seed = (params.seed + index) % 2**64 if index else params.seed
            rid = RequestId(request_id if num_seqs == 1 else f"{request_id}-{index}")
            requests.append(Request(rid, prompt.prompt_token_ids, child_params, self.eos_token_ids, max_tokens,
                                    cache_salt=prompt.cache_salt, parent_id=RequestId(request_id) if num_seqs > 1 else None,
                                    index=index, priority=priority))
        return requests[0], requests[1:]

    def check_priority(self, priority: object) -> None:
        """An int (not a bool) in int64's range; other than 0 only under scheduling policy
        "priority" (vLLM: "Priority scheduling is not enabled")."""
        if not isinstance(priority, int) or isinstance(priority, bool) or not -2**63 <= priority < 2**63:
            raise ValidationError(f"priority must be an integer in int64's range, got {priority!r}", "priority")
        if priority and not self.priority_scheduling:
            raise ValidationError(f"priority {priority} needs priority scheduling: start the engine with "
                                  f"scheduling_policy='priority' (--scheduling-policy priority)", "priority")

    def render_chat(self, messages: list[dict], chat_template: str | None = None,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    tools: list[dict] | None = None, documents: list[dict] | None = None,
                    chat_template_kwargs: dict[str, Any] | None = None) -> str:
        """One conversation -> the prompt text, through the model's chat template (from
        tokenizer_config.json or the GGUF metadata) or `chat_template`. The text already
        holds the template's special tokens: tokenize it with add_special_tokens=False.
        `documents` (retrieved texts, for templates that render them) and `chat_template_kwargs`
        (more variables for the template, e.g. Qwen3's enable_thinking) as vLLM takes them."""
        if self.tokenizer is None:
            raise ValidationError("chat needs a tokenizer", "messages")
        if add_generation_prompt and continue_final_message:
            raise ValidationError("add_generation_prompt and continue_final_message cannot both be true",
                                  "continue_final_message")
        conversation = normalize_messages(messages)
        variables = template_variables(documents, chat_template_kwargs)
        if chat_template is not None:   # the request's own: untrusted, rendered under bounds
            return render_untrusted_template(chat_template, conversation, add_generation_prompt,
                                             continue_final_message, self._special_tokens(), tools=tools,
                                             variables=variables)
        try:
            return self.tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=False, tools=tools, **variables)
        except (ValueError, TypeError, OverflowError, jinja2.TemplateError) as exc:
            raise ValidationError(f"cannot apply the chat template: {exc}", "chat_template") from exc

    def _special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, ... as the model's template sees them."""
        tokens = getattr(self.tokenizer, "special_tokens_map", {}) or {}
        return {name: value for name, value in tokens.items() if isinstance(value, str)}


# apply_chat_template's own arguments and the variables render_chat sets: chat_template_kwargs
# may not name them (vLLM's resolve_chat_template_kwargs drops such keys; a 400 says why here)
RESERVED_TEMPLATE_VARIABLES = frozenset({
    "messages", "conversation", "tools", "documents", "add_generation_prompt", "continue_final_message",
    "chat_template", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs"})


def template_variables(documents: Any, chat_template_kwargs: Any) -> dict[str, Any]:
    """The extra variables a chat template renders with: `documents` (a list of dicts of
    strings) and the keys of `chat_template_kwargs` (identifiers, none reserved)."""
    variables: dict[str, Any] = {}
    if documents is not None:
        if not isinstance(documents, list) or not all(
                isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in d.items())
                for d in documents):
            raise ValidationError("documents must be a list of {string: string} dicts", "documents")
        variables["documents"] = documents
    if chat_template_kwargs is not None:
        if not isinstance(chat_template_kwargs, dict):
            raise ValidationError("chat_template_kwargs must be an object", "chat_template_kwargs")
        for key in chat_template_kwargs:
            if not isinstance(key, str) or not key.isidentifier():
                raise ValidationError(f"chat_template_kwargs key {key!r} is not an identifier", "chat_template_kwargs")
            if key in RESERVED_TEMPLATE_VARIABLES:
                raise ValidationError(f"chat_template_kwargs cannot set {key!r}: it is the request's own field or a "
                                      "rendering option", "chat_template_kwargs")
        variables.update(chat_template_kwargs)
    return variables


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a conversation and flatten OpenAI content parts: a list of {"type": "text",
    "text": ...} becomes the texts joined by newlines (as vLLM does); None becomes "".
    Other keys (name, tool_calls, ...) pass through to the template untouched."""
    if not isinstance(messages, list) or not messages:
        raise ValidationError("messages must be a non-empty list of {'role', 'content'} dicts", "messages")
    conversation = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValidationError(f"messages[{position}] needs a string 'role'", "messages")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValidationError(f"messages[{position}]: only text content parts are supported", "messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ValidationError(f"messages[{position}].content must be a string or a list of text parts",
                                  "messages")
        conversation.append({**message, "content": content})
    return conversation
