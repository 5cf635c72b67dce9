"""``python -m agents.ray_rollouts``: token PPO with rollouts on Ray actors. The code lives in
:mod:`agents.token_ppo.ray`; this name stays for the commands and imports that use it."""

from agents.token_ppo.ray import RayTokenPPO, RolloutWorker, main
from agents.token_ppo.rollout import concat_rollouts
from textenvs.cli import run_cli

__all__ = ["RayTokenPPO", "RolloutWorker", "concat_rollouts", "main"]

if __name__ == "__main__":
    run_cli(main)  # a user error as one line, "error: ...", exit status 2
