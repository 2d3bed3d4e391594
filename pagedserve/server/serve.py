"""`pagedserve serve [MODEL] ...`: build the engine from flags (and TGI's launcher
environment variables, see tgi_settings.py), then serve the OpenAI and TGI APIs with
uvicorn. `python -m pagedserve.entrypoints.openai.api_server` runs the same command."""
from __future__ import annotations

import argparse
import errno
import gc
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from pagedserve.engine_args import EngineArgs
from pagedserve.errors import ValidationError
from pagedserve.logger import configure_default_logging
from pagedserve.lora_request import LoRARequest
from pagedserve.models.default_model import DEFAULT_MODEL_NAME
from pagedserve.server.compat_flags import add_compat_arguments
from pagedserve.server.context import DEFAULT_MAX_REQUEST_BODY_BYTES, DEFAULT_MAX_WAITING_REQUESTS, ServerSettings
from pagedserve.server.engine_flags import add_engine_arguments, engine_kwargs
from pagedserve.server.reasoning import REASONING_PARSERS
from pagedserve.server.tool_calls import TOOL_CALL_PARSERS
from pagedserve.server.tgi_settings import DEFAULT_PORT, add_tgi_arguments, apply_tgi_settings

logger = logging.getLogger(__name__)

API_KEY_ENV = "PAGEDSERVE_API_KEY"
ENGINE_PROCESS_ENV = "PAGEDSERVE_ENGINE_PROCESS"   # "1" / "0": --engine-process's default
GIL_PROBE_ENV = "PAGEDSERVE_GIL_PROBE"             # "1": the step timer's GIL probe thread runs
SWITCH_INTERVAL_ENV = "PAGEDSERVE_SWITCH_INTERVAL_MS"  # CPython's GIL switch interval (default 5 ms)
GRACEFUL_SHUTDOWN_S = 3.0   # --shutdown-timeout's default: after SIGTERM / Ctrl-C, for open requests
REQUEST_READ_TIMEOUT_S = 10.0   # --timeout-request-read's default (connections.py)


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="model folder, .gguf file or org/name in the local HF cache "
                             "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=None, help=f"default: env PORT, else {DEFAULT_PORT}")
    parser.add_argument("--served-model-name", default=None, nargs="+",
                        help="the name(s) clients use; all are accepted as `model`, the first is the one "
                             "responses report (default: the model path's basename)")
    parser.add_argument("--return-tokens-as-token-ids", action="store_true",
                        help='logprobs show tokens as "token_id:N" unless a request says otherwise')
    parser.add_argument("--enable-force-include-usage", action="store_true",
                        help="every streamed OpenAI response ends with a usage chunk, as if include_usage were set")
    parser.add_argument("--api-key", default=None,
                        help=f"require `Authorization: Bearer KEY` on /v1, the TGI generation routes, /tokenize, "
                             f"/detokenize, /dashboard and /debug (default: env {API_KEY_ENV}, else API_KEY)")
    parser.add_argument("--chat-template", default=None, help="a Jinja template, or a file holding one")
    parser.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                        help="a reasoning model's <think> ... </think> returned apart, as chat's `reasoning` "
                             "(and reasoning_content) beside `content`")
    parser.add_argument("--lora-modules", default=None, nargs="+", metavar="NAME=PATH",
                        help="LoRA adapters (PEFT folders) served under their own model names, as name=path or "
                             "vLLM's JSON {\"name\": ..., \"path\": ...}; needs --enable-lora")
    parser.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                        help="larger bodies get 413 (default: 16 MiB)")
    parser.add_argument("--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING_REQUESTS,
                        help="engine requests (one per prompt) allowed to wait beyond --max-num-seqs, both APIs; "
                             "one more is answered 503 (OpenAI) / 429 (TGI) with Retry-After "
                             f"(default {DEFAULT_MAX_WAITING_REQUESTS})")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='allow tool_choice "auto" (the default when a request has tools): calls are '
                             "parsed from the output with --tool-call-parser")
    parser.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                        help="how tool calls are found in the output for tool_choice \"auto\": hermes "
                             "(<tool_call>{json}</tool_call>), llama3_json ({\"name\", \"parameters\"}), "
                             "pythonic ([f(a=1)])")
    parser.add_argument("--dashboard-results-dir", default=None, metavar="DIR",
                        help="benchmark results the dashboard plots (`pagedserve bench` JSON, peer JSON lines); "
                             "default: the repository's benchmarks/")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                        help="run the engine core (scheduler + model executor) in a process of its own, as "
                             "vLLM V1 does; the server process keeps HTTP, tokenization and detokenization "
                             f"(default: env {ENGINE_PROCESS_ENV}, else on with a GPU, off on the CPU)")
    parser.add_argument("--disable-frontend-multiprocessing", dest="engine_process", action="store_false",
                        default=argparse.SUPPRESS, help="vLLM's spelling of --no-engine-process")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--timeout-request-read", type=_seconds, default=REQUEST_READ_TIMEOUT_S, metavar="SECONDS",
                        help="a request's headers must all arrive within this time of its first byte (of the "
                             "connection's opening, for the first), and its body may pause no longer than this "
                             "nor average under 500 bytes a second past it; "
                             "past it the connection is closed (a stalled body answered 408 first). Generating "
                             "the response is not bounded by it (0: no deadline; default %(default)s)")
    parser.add_argument("--shutdown-timeout", type=_seconds, default=GRACEFUL_SHUTDOWN_S, metavar="SECONDS",
                        help="after SIGTERM / Ctrl-C, how long open requests may go on before they are "
                             "cancelled (vLLM's flag; 0: at once; default %(default)s)")
    # None where TGI's environment may fill the value in (apply_tgi_settings)
    add_engine_arguments(parser.add_argument_group("engine"),
                         defaults={"dtype": None, "tensor_parallel_size": None},
                         notes={"model": "same as MODEL, vLLM's spelling", "dtype": "default: env DTYPE, else auto",
                                "tensor_parallel_size": "default: env NUM_SHARD, else 1"})
    add_tgi_arguments(parser)
    add_compat_arguments(parser)
    return parser


def make_parser() -> argparse.ArgumentParser:
    return add_serve_arguments(argparse.ArgumentParser(
        prog="pagedserve serve", description="Serve a model over an OpenAI-compatible HTTP API."))


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    """EngineArgs from the generated engine flags (after apply_tgi_settings, or without it)."""
    return EngineArgs(**{**engine_kwargs(args), "model": _model(args), "dtype": args.dtype or "auto",
                         "tensor_parallel_size": 1 if args.tensor_parallel_size is None else args.tensor_parallel_size})


def server_settings_from(args: argparse.Namespace) -> ServerSettings:
    model = _model(args)
    if args.max_waiting_requests < 0:
        raise ValidationError(f"--max-waiting-requests must be >= 0, got {args.max_waiting_requests}",
                              "max_waiting_requests")
    if getattr(args, "enable_auto_tool_choice", False) and not getattr(args, "tool_call_parser", None):
        raise ValidationError("--enable-auto-tool-choice requires --tool-call-parser", "tool_call_parser")
    names = args.served_model_name or [served_name_of(model)]
    return ServerSettings(served_model_name=names[0], served_model_aliases=tuple(names[1:]),
                          lora_modules=lora_modules_from(args, names),
                          reasoning_parser=getattr(args, "reasoning_parser", None),
                          return_tokens_as_token_ids=args.return_tokens_as_token_ids,
                          enable_force_include_usage=args.enable_force_include_usage,
                          enable_auto_tool_choice=getattr(args, "enable_auto_tool_choice", False),
                          tool_call_parser=getattr(args, "tool_call_parser", None),
                          model_root=model or DEFAULT_MODEL_NAME,
                          api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                          chat_template=load_chat_template(args.chat_template),
                          max_request_body_bytes=args.max_request_body_bytes,
                          max_waiting_requests=args.max_waiting_requests,
                          max_concurrent_requests=_given_max_concurrent_requests(args),
                          **({"dashboard_results_dir": Path(args.dashboard_results_dir).expanduser().resolve()}
                             if getattr(args, "dashboard_results_dir", None) else {}))


def lora_modules_from(args: argparse.Namespace, model_names: list[str]) -> tuple[LoRARequest, ...]:
    """--lora-modules' adapters, ids 1.. in the order given (checked against the model once the
    engine exists: LLMEngine.add_lora reads and checks each)."""
    from pagedserve.server.lora_routes import reserved_model_names
    specs = getattr(args, "lora_modules", None) or []
    if specs and not getattr(args, "enable_lora", False):
        raise ValidationError("--lora-modules needs --enable-lora", "enable_lora")
    adapters: list[LoRARequest] = []
    for spec in specs:
        if spec.lstrip().startswith("{"):
            try:
                fields = json.loads(spec)
                name, path = fields["name"], fields["path"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValidationError(f"--lora-modules {spec!r}: a JSON module needs \"name\" and \"path\" ({exc})",
                                      "lora_modules") from None
        else:
            name, sep, path = spec.partition("=")
            if not sep:
                raise ValidationError(f"--lora-modules {spec!r}: expected name=path", "lora_modules")
        if not isinstance(name, str) or not name or name in model_names or any(a.lora_name == name for a in adapters):
            raise ValidationError(f"--lora-modules: the name {name!r} is empty or already taken", "lora_modules")
        if name in reserved_model_names(model_names):
            raise ValidationError(f"--lora-modules: the name {name!r} is reserved: a request naming it as `model` "
                                  "runs the base model", "lora_modules")
        adapters.append(LoRARequest(name, len(adapters) + 1, os.path.expanduser(str(path))))
    return tuple(adapters)


def _given_max_concurrent_requests(args: argparse.Namespace) -> int | None:
    """TGI's max_concurrent_requests when given (flag or env): then it bounds both APIs;
    otherwise only the TGI routes, at TGI's default."""
    given = getattr(args, "max_concurrent_requests", None)
    if given is None and os.environ.get("MAX_CONCURRENT_REQUESTS"):
        given = int(os.environ["MAX_CONCURRENT_REQUESTS"])   # apply_tgi_settings has checked it
    return given


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


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads (as vLLM does): a port out of range or
    taken, or a host that is not this machine's, fails at once, not after the load."""
    if not 0 <= port <= 65535:
        raise ValidationError(f"--port must be in 0-65535, got {port}", "port")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ValidationError(f"--host {host!r}: {exc.strerror}", "host") from None
    from pagedserve.server.connections import Listener
    sock = Listener(family, kind, proto)   # its accept() ends asyncio's EMFILE burst (connections.py)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn: restart over TIME_WAIT
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ValidationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                              "host" if exc.errno == errno.EADDRNOTAVAIL else "port") from None
    return sock


def answered_cancellations(record: logging.LogRecord) -> bool:
    """uvicorn logs its cancellation of the requests still open when --shutdown-timeout runs out
    at ERROR; they are answered (503 / a stream's last error event: AnswerShutdownCancellation),
    a normal end of a graceful shutdown: an INFO line."""
    if record.levelno == logging.ERROR and "timeout graceful shutdown exceeded" in str(record.msg):
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


def run_server(args: argparse.Namespace) -> None:
    """Load the model, then serve until interrupted."""
    import uvicorn

    from pagedserve.frontend.async_engine import AsyncEngine
    from pagedserve.frontend.async_embedding_engine import AsyncEmbeddingEngine
    from pagedserve.frontend.embedding_engine import use_pooling
    from pagedserve.server.embeddings import build_embedding_app
    from pagedserve.frontend.gc_policy import raise_gen0_threshold
    from pagedserve.frontend.heap import limit_arenas, release_free_heap
    from pagedserve.server.app import build_app
    from pagedserve.server.connections import Server, raise_open_file_limit, request_deadline_protocol
    from pagedserve.server.middleware import AnswerShutdownCancellation

    configure_default_logging()
    logging.getLogger("pagedserve").setLevel(args.log_level.upper())
    tgi_settings = apply_tgi_settings(args)   # TGI flags and env vars, folded into args
    settings = server_settings_from(args)
    if os.environ.get(SWITCH_INTERVAL_ENV):   # a diagnostic knob: how much of the GIL's hand-over delay matters
        sys.setswitchinterval(float(os.environ[SWITCH_INTERVAL_ENV]) / 1e3)
    raise_open_file_limit()   # every open connection holds a descriptor: the soft limit (often 1024) up to the hard one
    listener = bind_listener(args.host, args.port)
    engine_process = engine_process_from(args)
    if not engine_process and "MALLOC_ARENA_MAX" not in os.environ:
        limit_arenas(1)   # before any thread starts: the CPU server's threads share one heap (-5 to -7 MiB)
    engine_args = engine_args_from(args)
    if use_pooling(engine_args):   # an embedding model: /v1/embeddings (server/embeddings.py)
        engine_process = False
        engine = AsyncEmbeddingEngine.from_engine_args(engine_args)
        app = build_embedding_app(engine, settings)
    else:
        engine = AsyncEngine.from_engine_args(engine_args, engine_process=engine_process,
                                              probe_gil=os.environ.get(GIL_PROBE_ENV) == "1")
        try:
            for lora in settings.lora_modules:   # a bad adapter stops the start, naming it
                engine.engine.add_lora(lora)
        except ValidationError:
            engine.shutdown()
            raise
        app = build_app(engine, settings, tgi_settings)
    # the hundreds of thousands of objects start-up made live as long as the server: frozen, out of
    # the collector's sight, no full collection walks them again (a walk holds the GIL ~0.1-0.4 s)
    gc.collect()
    gc.freeze()
    raise_gen0_threshold()   # the engine's steps (on a thread here, or in its process) make no gen-0 collection each
    release_free_heap()   # start-up's freed temporaries (weights, tokenizer, imports): ~30 MiB of RSS
    logger.info("serving %s on http://%s:%d (engine core %s)", settings.served_model_name, args.host, args.port,
                "in its own process" if engine_process else "on a thread")
    # open requests get --shutdown-timeout to finish after SIGTERM / Ctrl-C, then are cancelled (and
    # answered: 503, or a stream's last error event, AnswerShutdownCancellation): with the default
    # the server (and its tensor-parallel ranks) is gone within 10 s. New connections are refused
    # from the signal on. A connection idle between requests is closed after 5 s; one slow to send
    # its request, after --timeout-request-read
    server = Server(uvicorn.Config(AnswerShutdownCancellation(app), host=args.host, port=args.port,
                                   log_level=args.log_level,
                                   http=request_deadline_protocol(args.timeout_request_read),
                                   timeout_keep_alive=5, timeout_graceful_shutdown=args.shutdown_timeout))
    logging.getLogger("uvicorn.error").addFilter(answered_cancellations)   # after uvicorn's logging config
    died: list[Exception] = []
    if engine_process:   # a dead core process (vLLM's behaviour): its requests got the error; stop serving
        engine.add_death_listener(lambda error: (died.append(error), setattr(server, "should_exit", True)))
    # uvicorn re-raises the signal it handled once it has shut down: Ctrl-C as KeyboardInterrupt
    # (uvicorn.run swallows it too), SIGTERM through the handler it restores, which would end
    # the process before `finally` (the ranks then left only through their parent-death watches)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    terminated = False
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:
        pass
    except _Terminated:
        terminated = True
    finally:
        logger.info("stopping the engine")
        engine.shutdown()
        signal.signal(signal.SIGTERM, previous)
    if died:
        logger.error("exiting: %s", died[0])
        raise SystemExit(1)
    if terminated:   # end as SIGTERM would have, now that the engine is stopped
        signal.raise_signal(signal.SIGTERM)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:   # NaN too
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


class _Terminated(Exception):
    """SIGTERM reached the server (raised by _raise_terminated)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def engine_process_from(args: argparse.Namespace) -> bool:
    """--engine-process, else PAGEDSERVE_ENGINE_PROCESS, else on with a GPU and off on the CPU:
    there a second interpreter adds its own torch (~300 MiB) and its step loop competes for the
    few cores that run the step, whose C++ kernels release the GIL (benchmarks/RESULTS.md, issue 19)."""
    if args.engine_process is not None:
        return args.engine_process
    if ENGINE_PROCESS_ENV in os.environ:
        return os.environ[ENGINE_PROCESS_ENV] != "0"
    device = getattr(args, "device", None) or "auto"
    if device == "auto":
        import torch
        return torch.cuda.is_available()
    return device.startswith("cuda")


def _model(args: argparse.Namespace) -> str | None:
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValidationError(f"two models given: {args.model_tag!r} and --model {args.model!r}", "model")
    return args.model_tag or args.model
