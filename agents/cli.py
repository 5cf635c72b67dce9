"""Command lines generated from config dataclasses: every field a flag (``--num-envs`` for
``num_envs``), its docstring its ``--help``, booleans strict (``true`` / ``false``), dicts JSON
objects, and a field's range check (a config's table of checks) run by argparse on the flag, so
a bad value is refused by name before any work. The token trainer's CLI is built this way.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from agents.common import parse_bool
from textenvs.cli import checked_arg, json_object


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (a string right after ``name: type =
    value``), read from its source: what the CLI's ``--help`` says of each option."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for field, after in zip(body, body[1:]):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[field.target.id] = " ".join(after.value.value.split())
    return docs


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    checks: dict | None = None,
    skip: tuple = (),
    defaults: object | None = None,
) -> None:
    """One flag per field of the dataclass ``cls`` (except ``skip``), defaulting to the field's
    value in ``defaults`` (an instance; None: ``cls()``); ``checks[name](name, value)``
    validates a number on the command line."""
    defaults = cls() if defaults is None else defaults
    docs, checks = field_docs(cls), checks or {}
    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        doc = docs.get(f.name, "").replace("%", "%%") + " (default: %(default)s)"
        # the field's type without its None: ``float | None`` reads a float
        base = next((t for t in typing.get_args(types[f.name]) if t is not type(None)), None)
        base = base or typing.get_origin(types[f.name]) or types[f.name]
        if base is bool:
            kind = parse_bool
        elif base is dict:
            kind = json_object
        elif f.name in checks:  # argparse refuses a value out of range, naming the flag
            kind = checked_arg(base, checks[f.name])
        else:
            kind = base
        parser.add_argument(flag, type=kind, default=value, help=doc)


def config_from_args(cls: type, args: dict):
    """The ``cls`` of the parsed arguments that are its fields (the rest are left in ``args``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: args.pop(k) for k in list(args) if k in names})
