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
