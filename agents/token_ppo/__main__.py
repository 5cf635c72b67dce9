"""``python -m agents.token_ppo``: the command line (:mod:`agents.token_ppo.cli`)."""

from agents.token_ppo.cli import main
from textenvs.cli import run_cli

if __name__ == "__main__":
    run_cli(main)  # a user error as one line, "error: ...", exit status 2
