"""How every textenvs command line reports a user's mistake: one line, like argparse.

A bad flag value, a missing checkpoint or a dataset that does not load is the user's to fix: the
command prints ``error: <what is wrong and how to fix it>`` on stderr and exits with status 2, as
argparse does for a bad flag. A bug (any other exception) keeps its full traceback. Set
``TEXTENVS_TRACEBACK=1`` to see the traceback of a user error too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import gymnasium as gym

# The exceptions our checks raise with a message that says how to fix the input: bad values
# (ValueError), missing or unreadable files and unreachable datasets (OSError and its
# FileNotFoundError, DatasetUnavailableError), a missing optional extra (ImportError, whose
# message names the pip command), an id gymnasium does not know.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError, gym.error.Error)


class CommandLineError(SystemExit):
    """A refusal of a command's arguments or state (an ``--out`` folder in use, a run of another
    budget): ``error: <message>`` and exit status 2 under :func:`run_cli`; a ``SystemExit``, so a
    caller of ``main()`` that catches nothing still stops with the message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def run_cli(main: Callable[[], object]) -> None:
    """Run a command-line ``main()``; a user error becomes ``error: ...`` and exit status 2."""
    try:
        main()
    except CommandLineError as e:
        print(f"error: {' '.join(e.message.split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except USER_ERRORS as e:
        if os.environ.get("TEXTENVS_TRACEBACK") == "1":
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _arg_type(check: Callable[[str, object], object], kind: type, what: str):
    """An argparse ``type=`` that parses ``kind`` then runs ``check``: argparse reports a refusal
    as ``argument --flag: <message>`` and exit status 2, before any work."""
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            return check("value", value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).replace("value ", "", 1)) from None

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


def checked_arg(kind: type, check: Callable[[str, object], object]):
    """``type=`` that parses ``kind`` and runs ``check(name, value)`` (a config's own check)."""
    return _arg_type(check, kind, "an int" if kind is int else "a number")


def json_object(text: str) -> dict:
    """``type=`` for a flag that takes a JSON object (``--env-kwargs '{"k": 4}'``)."""
    import argparse
    import json

    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text[:80]!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text[:80]!r}")
    return value


def int_arg(low: int | None = 1, high: int | None = None):
    """``type=`` for an int flag in ``[low, high]`` (default: a count, >= 1)."""
    from textenvs.checks import ints

    return checked_arg(int, ints(low, high))


def float_arg(
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
):
    """``type=`` for a finite float flag in the range (NaN and infinities are refused)."""
    from textenvs.checks import floats

    return checked_arg(float, floats(low, high, low_open, high_open))
