"""TGI's request bodies and their validation, with text-generation-inference's rules and
messages (router/src/validation.rs), into one ValidGenerateRequest the routes run.

Every rule raises pagedserve's ValidationError with TGI's message; errors.py answers it as
TGI does: 422 `{"error": message, "error_type": "validation"}`."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pagedserve.errors import ValidationError
from pagedserve.frontend.prompt_bound import prompt_length_bound
from pagedserve.sampling_params import SamplingParams
from pagedserve.server import structured
from pagedserve.server.tgi_settings import TGISettings

MAX_SEED = 2**32   # seeds TGI draws when none is given (reported back in details.seed)
SEED_LIMIT = 2**64  # TGI's seed is a u64: 0 <= seed < 2**64

# Strict numbers (a bool is not an int, "2" and 2.0 are not ints) and finite floats, as
# TGI's serde types are: anything else is a 422 naming the field.
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class GenerateParameters(BaseModel):
    model_config = _STRICT

    best_of: int | None = Field(default=None, ge=1)
    decoder_input_details: bool = False
    details: bool = False   # TGI's serde default; /generate gives details with decoder_input_details too
    do_sample: bool = False
    frequency_penalty: float | None = None
    max_new_tokens: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = Field(default=None, ge=0)
    top_p: float | None = None
    truncate: int | None = Field(default=None, ge=0)
    typical_p: float | None = None
    watermark: bool = False
    grammar: Any = None
    adapter_id: str | None = None


class GenerateRequest(BaseModel):
    model_config = _STRICT

    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False
    add_special_tokens: bool = True


@dataclass
class ValidGenerateRequest:
    inputs: str
    input_ids: list[int]        # after truncation
    params: SamplingParams
    best_of: int
    sampling: bool
    seed: int | None            # reported in details (None when greedy)
    details: bool
    decoder_input_details: bool
    top_n_tokens: int
    return_full_text: bool
    constraint: structured.Constraint | None = None   # parameters.grammar (its compile errors name it)
    adapter_id: str | None = None   # a LoRA adapter's name (--lora-modules / TGI's --lora-adapters)


def validate(request: GenerateRequest, settings: TGISettings, max_total_tokens: int, tokenizer: Any,
             stream: bool) -> ValidGenerateRequest:
    """TGI's rules, in TGI's order; raises ValidationError (a 422) with TGI's message."""
    p = request.parameters
    best_of = _check_best_of(p, settings, stream)
    _check_ranges(p, settings)
    input_ids, max_new_tokens = _check_inputs(request, settings, max_total_tokens, tokenizer)
    sampling = p.do_sample   # do_sample=false is greedy whatever the temperature
    seed = (p.seed if p.seed is not None else random.randrange(MAX_SEED)) if sampling else None
    top_n_tokens = p.top_n_tokens or 0
    constraint = structured.from_tgi_grammar(p.grammar)   # 422 naming parameters.grammar
    params = SamplingParams(
        n=best_of, best_of=best_of if best_of > 1 else None,
        temperature=(p.temperature if p.temperature is not None else 1.0) if sampling else 0.0,
        top_p=p.top_p if sampling and p.top_p is not None else 1.0,
        top_k=p.top_k if sampling and p.top_k is not None else 0,
        typical_p=p.typical_p if sampling and p.typical_p is not None else 1.0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        frequency_penalty=p.frequency_penalty or 0.0, seed=seed,
        stop=list(p.stop), include_stop_str_in_output=True,   # TGI keeps the stop sequence in the text
        max_tokens=max_new_tokens, logprobs=top_n_tokens,    # logprobs=0: the sampled token's own
        prompt_logprobs=0 if p.decoder_input_details else None,
        structured_outputs=None if constraint is None else constraint.params)
    return ValidGenerateRequest(request.inputs, input_ids, params, best_of, sampling, seed, p.details,
                                p.decoder_input_details, top_n_tokens, bool(p.return_full_text), constraint,
                                p.adapter_id)


def _check_best_of(p: GenerateParameters, settings: TGISettings, stream: bool) -> int:
    best_of = p.best_of if p.best_of is not None else 1
    if best_of != 1:
        if settings.max_best_of == 1:
            raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
        if best_of > settings.max_best_of:
            raise ValidationError(f"`best_of` must be > 0 and <= {settings.max_best_of}. Given: {best_of}")
        if stream:
            raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
        if not p.do_sample:   # do_sample=false is greedy here, so best_of needs it
            raise ValidationError("you must use sampling when `best_of` is > 1")
        if p.seed is not None:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
    if p.decoder_input_details and stream:
        raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
    return best_of


def _check_ranges(p: GenerateParameters, settings: TGISettings) -> None:
    if p.temperature is not None and p.temperature <= 0.0:
        raise ValidationError("`temperature` must be strictly positive")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0.0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise ValidationError("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise ValidationError("`top_k` must be strictly positive")
    if p.max_new_tokens == 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    if len(p.stop) > settings.max_stop_sequences:
        raise ValidationError(f"`stop` supports up to {settings.max_stop_sequences} stop sequences. "
                              f"Given: {len(p.stop)}")
    if any(not s for s in p.stop):
        raise ValidationError("`stop` sequences must not be empty")
    if (p.top_n_tokens or 0) > settings.max_top_n_tokens:
        raise ValidationError(f"`top_n_tokens` must be >= 0 and <= {settings.max_top_n_tokens}. "
                              f"Given: {p.top_n_tokens}")
    if p.watermark:
        raise ValidationError("watermark is not supported")


def _check_inputs(request: GenerateRequest, settings: TGISettings, max_total_tokens: int,
                  tokenizer: Any) -> tuple[list[int], int]:
    """(input ids after truncation, max_new_tokens); TGI's default max_new_tokens fills the context."""
    p = request.parameters
    if not request.inputs:
        raise ValidationError("`inputs` cannot be empty")
    max_input_tokens = settings.input_limit(max_total_tokens)
    if p.truncate is not None and (p.truncate == 0 or p.truncate > max_input_tokens):
        raise ValidationError(f"`truncate` must be strictly positive and less than {max_input_tokens}. "
                              f"Given: {p.truncate}")
    if p.truncate is None:   # refused before tokenizing it whole where it surely cannot fit
        found = prompt_length_bound(tokenizer).at_least(request.inputs, max_input_tokens + 1)
        if found is not None:
            raise ValidationError(f"`inputs` must have less than {max_input_tokens} tokens. Given: at least "
                                  f"{found.tokens} ({found.reason})")
    if p.truncate is not None:   # keep the last `truncate` tokens: read from a suffix where that is exact
        input_ids = prompt_length_bound(tokenizer).last_ids(request.inputs, p.truncate, request.add_special_tokens)
    else:
        input_ids = tokenizer.encode(request.inputs, add_special_tokens=request.add_special_tokens)
    input_length = len(input_ids)
    max_new_tokens = p.max_new_tokens if p.max_new_tokens is not None else max(max_total_tokens - input_length, 1)
    if input_length + max_new_tokens > max_total_tokens:
        raise ValidationError(f"`inputs` tokens + `max_new_tokens` must be <= {max_total_tokens}. "
                              f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`")
    if input_length > max_input_tokens:
        raise ValidationError(f"`inputs` must have less than {max_input_tokens} tokens. Given: {input_length}")
    return input_ids, max_new_tokens
