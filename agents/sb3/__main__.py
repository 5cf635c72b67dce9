"""``python -m agents.sb3``: the command line (:mod:`agents.sb3.cli`)."""

from agents.sb3.cli import main
from textenvs.cli import run_cli

if __name__ == "__main__":
    run_cli(main)  # a user error as one line, "error: ...", exit status 2
