"""vLLM `serve` flags that scripts pass and that mean nothing here: accepted with a log line
(instead of argparse's "unrecognized arguments"); and vLLM flags whose feature pagedserve
lacks: refused at once with a message naming the missing feature (argparse's exit code 2)."""
from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)

# flag -> why it is a no-op here (True: the flag takes a value)
NO_OP_FLAGS: dict[str, tuple[bool, str]] = {
    "--enable-chunked-prefill": (False, "prefills are always chunked under --max-num-batched-tokens"),
    "--no-enable-chunked-prefill": (False, "prefills are always chunked under --max-num-batched-tokens"),
    "--disable-log-requests": (False, "requests are not logged"),
    "--enable-log-requests": (False, "requests are not logged"),
    "--disable-log-stats": (False, "there is no periodic stats log; see /metrics"),
    "--disable-uvicorn-access-log": (False, "uvicorn's access log follows --log-level"),
    "--uvicorn-log-level": (True, "uvicorn's log level follows --log-level"),
    "--enable-tokenizer-info-endpoint": (False, "GET /tokenizer_info is always served (behind the API key)"),
    "--guided-decoding-backend": (True, "structured outputs always compile with xgrammar"),
}

# flag -> the missing feature (True: the flag takes a value)
MISSING_FEATURE_FLAGS: dict[str, tuple[bool, str]] = {
    "--speculative-config": (True, "speculative decoding"),
}


class _NoOp(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:   # type: ignore[override]
        reason = NO_OP_FLAGS[option_string][1]
        logger.warning("%s is accepted for vLLM compatibility and ignored: %s", option_string, reason)
        ignored = list(getattr(namespace, "ignored_vllm_flags", None) or [])
        setattr(namespace, "ignored_vllm_flags", ignored + [option_string])


class _Missing(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:   # type: ignore[override]
        feature = MISSING_FEATURE_FLAGS[option_string][1]
        parser.error(f"{option_string}: not supported by pagedserve (no {feature})")


def add_compat_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vLLM compatibility (no-ops; see the log)")
    for flag, (takes_value, reason) in NO_OP_FLAGS.items():
        group.add_argument(flag, action=_NoOp, nargs=None if takes_value else 0, dest="ignored_vllm_flag_values",
                           metavar="VALUE", default=argparse.SUPPRESS, help=f"ignored: {reason}")
    for flag, (takes_value, feature) in MISSING_FEATURE_FLAGS.items():
        parser.add_argument(flag, action=_Missing, nargs=None if takes_value else 0, dest="missing_vllm_feature",
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)
