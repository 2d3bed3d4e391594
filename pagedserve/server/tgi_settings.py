"""TGI's launcher settings: the text-generation-launcher flags on `pagedserve serve`, and
the same settings read from TGI's environment variables. An explicit flag wins over the
environment; the environment wins over pagedserve's defaults.

    TGI setting                 env var                        pagedserve field
    --model-id                  MODEL_ID                       model
    --num-shard                 NUM_SHARD                      tensor_parallel_size
    --quantize                  QUANTIZE                       quantization (awq, gptq, compressed-tensors,
                                                               fp8, bitsandbytes; others: startup error)
    --dtype                     DTYPE                          dtype
    --max-input-tokens          MAX_INPUT_TOKENS (MAX_INPUT_LENGTH)   TGISettings.max_input_tokens
    --max-total-tokens          MAX_TOTAL_TOKENS               max_model_len
    --max-batch-prefill-tokens  MAX_BATCH_PREFILL_TOKENS       max_num_batched_tokens
    --max-concurrent-requests   MAX_CONCURRENT_REQUESTS        TGISettings (429 beyond it)
    --max-best-of / --max-stop-sequences / --max-top-n-tokens  TGISettings
    --port                      PORT                           port
    --api-key                   API_KEY                        api_key
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Mapping

from pagedserve.errors import ValidationError

DEFAULT_PORT = 8000


@dataclass(frozen=True)
class TGISettings:
    """What the TGI routes enforce and /info reports (TGI's launcher defaults)."""

    model_id: str | None = None
    max_input_tokens: int | None = None     # None: max_total_tokens - 1
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4
    dtype: str = "auto"

    def input_limit(self, max_total_tokens: int) -> int:
        if self.max_input_tokens is None:
            return max_total_tokens - 1
        return self.max_input_tokens


def add_tgi_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TGI launcher settings (also read from TGI's environment variables)")
    group.add_argument("--model-id", default=None, help="same as MODEL (env MODEL_ID)")
    group.add_argument("--num-shard", type=int, default=None, help="tensor parallel size (env NUM_SHARD)")
    group.add_argument("--quantize", default=None, help="quantization: awq, gptq, compressed-tensors, fp8 or "
                                                        "bitsandbytes, as --quantization (env QUANTIZE)")
    group.add_argument("--max-input-tokens", "--max-input-length", dest="max_input_tokens", type=int, default=None,
                       help="longest prompt on the TGI routes (env MAX_INPUT_TOKENS or MAX_INPUT_LENGTH; "
                            "default: max total tokens - 1)")
    group.add_argument("--max-total-tokens", type=int, default=None,
                       help="prompt + generated tokens: max_model_len (env MAX_TOTAL_TOKENS)")
    group.add_argument("--max-batch-prefill-tokens", type=int, default=None,
                       help="max_num_batched_tokens (env MAX_BATCH_PREFILL_TOKENS)")
    group.add_argument("--max-concurrent-requests", type=int, default=None,
                       help="TGI routes answer 429 beyond this many in flight (env MAX_CONCURRENT_REQUESTS; 128)")
    group.add_argument("--max-best-of", type=int, default=None, help="env MAX_BEST_OF (default 2)")
    group.add_argument("--max-stop-sequences", type=int, default=None, help="env MAX_STOP_SEQUENCES (default 4)")
    group.add_argument("--max-top-n-tokens", type=int, default=None, help="env MAX_TOP_N_TOKENS (default 5)")


def apply_tgi_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> TGISettings:
    """Fold TGI's flags and environment into `args` (model, tensor_parallel_size, dtype,
    max_model_len, max_num_batched_tokens, port, api_key), in place, and return the TGI
    route settings. Raises ValidationError naming the setting for bad or unsupported values."""
    env = os.environ if environ is None else environ
    quantize = args.quantize if args.quantize is not None else env.get("QUANTIZE", "")
    if quantize:
        given = getattr(args, "quantization", None)
        if given is not None and given != quantize:
            raise ValidationError(f"two quantizations given: --quantization {given!r} and --quantize / QUANTIZE "
                                  f"{quantize!r}", "quantize")
        args.quantization = quantize
    if args.model_id is not None:
        given = args.model_tag or args.model
        if given is not None and given != args.model_id:
            raise ValidationError(f"two models given: {given!r} and --model-id {args.model_id!r}", "model")
        args.model = args.model_id
    elif args.model_tag is None and args.model is None and env.get("MODEL_ID"):
        args.model = env["MODEL_ID"]
    args.tensor_parallel_size = _pick("num_shard", args.num_shard, args.tensor_parallel_size, env, ("NUM_SHARD",), 1)
    args.dtype = args.dtype or env.get("DTYPE") or "auto"
    args.max_model_len = _pick("max_total_tokens", args.max_total_tokens, args.max_model_len, env,
                               ("MAX_TOTAL_TOKENS",), None)
    args.max_num_batched_tokens = _pick("max_batch_prefill_tokens", args.max_batch_prefill_tokens,
                                        args.max_num_batched_tokens, env, ("MAX_BATCH_PREFILL_TOKENS",), None)
    args.port = args.port if args.port is not None else _env_int(env, "PORT", DEFAULT_PORT)
    if args.api_key is None and env.get("API_KEY"):
        args.api_key = env["API_KEY"]
    settings = TGISettings(
        model_id=args.model,
        max_input_tokens=_pick("max_input_tokens", args.max_input_tokens, None, env,
                               ("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"), None),
        max_concurrent_requests=_pick("max_concurrent_requests", args.max_concurrent_requests, None, env,
                                      ("MAX_CONCURRENT_REQUESTS",), 128),
        max_best_of=_pick("max_best_of", args.max_best_of, None, env, ("MAX_BEST_OF",), 2),
        max_stop_sequences=_pick("max_stop_sequences", args.max_stop_sequences, None, env,
                                 ("MAX_STOP_SEQUENCES",), 4),
        max_top_n_tokens=_pick("max_top_n_tokens", args.max_top_n_tokens, None, env, ("MAX_TOP_N_TOKENS",), 5),
        dtype=args.dtype)
    _check(settings, args.max_model_len)
    return settings


def _pick(name: str, tgi_flag: int | None, own_flag: int | None, env: Mapping[str, str], env_names: tuple[str, ...],
          default: int | None) -> int | None:
    """TGI flag, else pagedserve's own flag, else the first env var set, else the default."""
    if tgi_flag is not None and own_flag is not None and tgi_flag != own_flag:
        raise ValidationError(f"--{name.replace('_', '-')} {tgi_flag} contradicts the equivalent pagedserve flag "
                              f"({own_flag})", name)
    if tgi_flag is not None:
        return tgi_flag
    if own_flag is not None:
        return own_flag
    for env_name in env_names:
        if env.get(env_name):
            return _env_int(env, env_name, default)
    return default


def _env_int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    value = env.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValidationError(f"the environment variable {name}={value!r} is not an integer", name.lower()) from None


def _check(settings: TGISettings, max_total_tokens: int | None) -> None:
    for name in ("max_concurrent_requests", "max_best_of", "max_top_n_tokens"):
        if getattr(settings, name) < (1 if name != "max_top_n_tokens" else 0):
            raise ValidationError(f"{name} must be positive, got {getattr(settings, name)}", name)
    if settings.max_stop_sequences < 0:
        raise ValidationError(f"max_stop_sequences must be >= 0, got {settings.max_stop_sequences}",
                              "max_stop_sequences")
    if settings.max_input_tokens is not None:
        if settings.max_input_tokens < 1:
            raise ValidationError(f"max_input_tokens must be positive, got {settings.max_input_tokens}",
                                  "max_input_tokens")
        if max_total_tokens is not None and settings.max_input_tokens >= max_total_tokens:
            raise ValidationError(f"max_input_tokens ({settings.max_input_tokens}) must be < max_total_tokens "
                                  f"({max_total_tokens})", "max_input_tokens")
