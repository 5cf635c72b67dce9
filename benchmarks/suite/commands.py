"""The agent commands behind the main job's rows: one seed of a suite cell as the command line a
user runs (``python -m agents.sb3 ...``, ``python -m agents.token_ppo ...``).

Each command trains with exactly the settings of the suite's cell (the same config and env
arguments: ``tests/test_bench.py`` parses every command with its own CLI and compares); the suite
also evaluates at the points of its learning curve, which the command does once, at the end. The
README's table lists these commands; ``python -m benchmarks.suite.commands`` prints them.
"""

from __future__ import annotations

import dataclasses
import json
import shlex

import gymnasium as gym

import textenvs
from benchmarks.suite.agents import sb3_setup, token_config
from benchmarks.suite.cells import Cell
from benchmarks.suite.settings import PRESETS

# The README table's rows: (env id, suite agent)
MAIN_JOB_ROWS = (
    ("textenvs/Summarize-v0", "ppo_prior"),
    ("textenvs/Summarize-v0", "token_ppo"),
    ("textenvs/Translate-v0", "token_ppo"),
    ("textenvs/EditSummary-v0", "maskable_prior"),
)
SB3_AGENTS = {
    "ppo": ("ppo", "mlp"),
    "ppo_prior": ("ppo", "lm_prior"),
    "maskable_ppo": ("maskable_ppo", "mlp"),
    "maskable_prior": ("maskable_ppo", "lm_prior"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value(value) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, dict) else str(value)


def _changed(config, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags of the config's fields that differ from the CLI's defaults (its dataclass's)."""
    default = type(config)()
    argv = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name not in skip and value != getattr(default, field.name):
            argv += [_flag(field.name), _value(value)]
    return argv


def cell_of(env_id: str, agent: str, preset: str = "default", seed: int = 0) -> Cell:
    return Cell(agent, env_id, seed, PRESETS[preset], textenvs.TINY, None)


def command(env_id: str, agent: str, preset: str = "default", seed: int = 0) -> list[str]:
    """``["python", "-m", "agents.<x>", ...]``: one seed of the suite's cell as a command."""
    cell = cell_of(env_id, agent, preset, seed)
    if agent in SB3_AGENTS:
        config, kwargs, train_kwargs, total = sb3_setup(cell, *SB3_AGENTS[agent])
        if train_kwargs != kwargs:
            raise ValueError(f"{agent} trains and evaluates on different envs: no one command")
        argv = ["--env-id", env_id, "--policy", config.policy, "--algo", config.algo]
        argv += ["--seed", str(seed)]
        argv += _changed(config, skip=("env_id", "policy", "algo", "policy_kwargs", "seed"))
        argv += ["--k", str(kwargs["k"]), "--max-steps", str(kwargs["max_steps"])]
        argv += ["--total-steps", str(total), "--eval-samples", str(cell.budget.eval_samples)]
        return ["python", "-m", "agents.sb3", *argv]
    if agent == "token_ppo":
        config = token_config(cell, "gae", {})
        argv = ["--env-id", env_id, "--seed", str(seed)]
        argv += _changed(config, skip=("env_id", "seed", "env_kwargs"))
        # the suite scores the test split with the env's own metric, whatever the training reward
        metric = gym.make(env_id, max_steps=1).unwrapped.shaper.name
        if config.reward and config.reward != metric:
            argv += ["--eval-reward", metric]
        return ["python", "-m", "agents.token_ppo", *argv]
    raise ValueError(
        f"no command for suite agent {agent!r}; commands exist for "
        f"{', '.join([*SB3_AGENTS, 'token_ppo'])}"
    )


def main_job_commands(seed: int = 0) -> list[str]:
    """The README table's rows as commands, one seed each."""
    return [shlex.join(command(env_id, agent, seed=seed)) for env_id, agent in MAIN_JOB_ROWS]


if __name__ == "__main__":
    print("\n".join(main_job_commands()))
