"""Command-line flags generated from the EngineArgs fields (their type, default and help
text), so the knob list is kept once: `--max-model-len` from max_model_len, a bool that
defaults to False is a plain switch, any other bool gets --x / --no-x."""
from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields
from typing import Any, Collection, Mapping

from pagedserve.engine_args import EngineArgs


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_engine_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                         defaults: Mapping[str, Any] | None = None, notes: Mapping[str, str] | None = None,
                         exclude: Collection[str] = ()) -> None:
    """One flag per EngineArgs field but those in `exclude`. `defaults` replaces a field's
    default on this command line (e.g. None where an environment variable may fill it in
    later); `notes` are appended to a field's help."""
    defaults, notes = defaults or {}, notes or {}
    hints = typing.get_type_hints(EngineArgs)
    for f in fields(EngineArgs):
        if f.name in exclude:
            continue
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        names = [flag_of(f.name), *f.metadata.get("aliases", ())]
        help_text = f.metadata.get("help", "")
        if f.name in notes:
            help_text = f"{help_text} ({notes[f.name]})" if help_text else notes[f.name]
        kind = _base_type(hints[f.name])
        if kind is bool:
            action = "store_true" if f.default is False else argparse.BooleanOptionalAction
            parser.add_argument(*names, action=action, default=default, help=help_text)
        else:
            parser.add_argument(*names, type=kind, default=default, choices=f.metadata.get("choices"),
                                help=help_text)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineArgs fields that `args` has flags for, by name."""
    return {f.name: getattr(args, f.name) for f in fields(EngineArgs) if hasattr(args, f.name)}


def _base_type(hint: Any) -> type:
    """int for `int | None`, and so on."""
    members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if members:
        if len(members) != 1:
            raise TypeError(f"an EngineArgs field of type {hint} has no flag type")
        return members[0]
    return hint
