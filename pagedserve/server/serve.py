"""`pagedserve serve [MODEL] ...`: build the engine from flags (and TGI's launcher
environment variables, see tgi_settings.py), then serve the OpenAI and TGI APIs with
uvicorn. `python -m pagedserve.entrypoints.openai.api_server` runs the same command."""
from __future__ import annotations

import argparse
import logging
import os

from pagedserve.engine_args import EngineArgs
from pagedserve.errors import ValidationError
from pagedserve.logger import configure_default_logging
from pagedserve.models.default_model import DEFAULT_MODEL_NAME
from pagedserve.server.context import DEFAULT_MAX_REQUEST_BODY_BYTES, ServerSettings
from pagedserve.server.engine_flags import add_engine_arguments, engine_kwargs
from pagedserve.server.tgi_settings import DEFAULT_PORT, add_tgi_arguments, apply_tgi_settings

logger = logging.getLogger(__name__)

API_KEY_ENV = "PAGEDSERVE_API_KEY"


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="model folder, .gguf file or org/name in the local HF cache "
                             "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=None, help=f"default: env PORT, else {DEFAULT_PORT}")
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients use (default: the model path's basename)")
    parser.add_argument("--api-key", default=None,
                        help=f"require `Authorization: Bearer KEY` on /v1, the TGI generation routes, /tokenize "
                             f"and /detokenize (default: env {API_KEY_ENV}, else API_KEY)")
    parser.add_argument("--chat-template", default=None, help="a Jinja template, or a file holding one")
    parser.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    # None where TGI's environment may fill the value in (apply_tgi_settings)
    add_engine_arguments(parser.add_argument_group("engine"),
                         defaults={"dtype": None, "tensor_parallel_size": None},
                         notes={"model": "same as MODEL, vLLM's spelling", "dtype": "default: env DTYPE, else auto",
                                "tensor_parallel_size": "default: env NUM_SHARD, else 1"})
    add_tgi_arguments(parser)
    return parser


def make_parser() -> argparse.ArgumentParser:
    return add_serve_arguments(argparse.ArgumentParser(
        prog="pagedserve serve", description="Serve a model over an OpenAI-compatible HTTP API."))


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    """EngineArgs from the generated engine flags (after apply_tgi_settings, or without it)."""
    return EngineArgs(**{**engine_kwargs(args), "model": _model(args), "dtype": args.dtype or "auto",
                         "tensor_parallel_size": args.tensor_parallel_size or 1})


def server_settings_from(args: argparse.Namespace) -> ServerSettings:
    model = _model(args)
    return ServerSettings(served_model_name=args.served_model_name or served_name_of(model),
                          model_root=model or DEFAULT_MODEL_NAME,
                          api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                          chat_template=load_chat_template(args.chat_template),
                          max_request_body_bytes=args.max_request_body_bytes)


def served_name_of(model: str | None) -> str:
    """The default served name: the local path's basename, else the name as given."""
    if model is None:
        return DEFAULT_MODEL_NAME
    path = os.path.expanduser(model)
    if os.path.exists(path):
        return os.path.basename(os.path.normpath(path))
    return model


def load_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:
        raise ValidationError(f"--chat-template {value!r} is neither a file nor a Jinja template", "chat_template")
    return value


def run_server(args: argparse.Namespace) -> None:
    """Load the model, then serve until interrupted."""
    import uvicorn

    from pagedserve.frontend.async_engine import AsyncEngine
    from pagedserve.server.app import build_app

    configure_default_logging()
    logging.getLogger("pagedserve").setLevel(args.log_level.upper())
    tgi_settings = apply_tgi_settings(args)   # TGI flags and env vars, folded into args
    settings = server_settings_from(args)
    engine = AsyncEngine.from_engine_args(engine_args_from(args))
    app = build_app(engine, settings, tgi_settings)
    logger.info("serving %s on http://%s:%d", settings.served_model_name, args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=5)
    finally:
        engine.shutdown()


def _model(args: argparse.Namespace) -> str | None:
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValidationError(f"two models given: {args.model_tag!r} and --model {args.model!r}", "model")
    return args.model_tag or args.model
