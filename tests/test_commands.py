"""The README's commands behind the main job's rows train with exactly the suite's settings: each
is parsed by its own CLI and compared with the config and env arguments the suite's cell uses."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest

import textenvs
from benchmarks.suite.agents import sb3_setup, token_config
from benchmarks.suite.commands import (
    MAIN_JOB_ROWS,
    SB3_AGENTS,
    cell_of,
    command,
    main_job_commands,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("env_id,agent", MAIN_JOB_ROWS)
def test_each_rows_command_parses_to_the_suites_settings(env_id, agent, seed):
    argv = command(env_id, agent, seed=seed)
    assert argv[:2] == ["python", "-m"]
    cell = cell_of(env_id, agent, seed=seed)
    if agent in SB3_AGENTS:
        from agents.sb3.cli import config_of, parser

        p = parser()
        args = p.parse_args(argv[3:])
        config, env_kwargs = config_of(p, args)
        want, want_kwargs, _, total = sb3_setup(cell, *SB3_AGENTS[agent])
        assert config == want
        # the suite names the model; the command leaves it to the id's default, the same one
        assert want_kwargs.pop("model") == textenvs.TINY and "model" not in env_kwargs
        assert env_kwargs == want_kwargs
        assert args.total_steps == total and args.eval_samples == cell.budget.eval_samples
    else:
        from agents.cli import config_from_args
        from agents.token_ppo.cli import parser
        from agents.token_ppo.config import TokenPPOConfig

        config = config_from_args(TokenPPOConfig, vars(parser().parse_args(argv[3:])))
        want = token_config(cell, "gae", {})
        assert dataclasses.replace(config, eval_reward=None) == want
        if env_id == "textenvs/Translate-v0":
            assert want.reward == "chrf" and config.eval_reward == "bleu"  # the table's metric


def test_the_readme_gives_every_rows_command():
    readme = (ROOT / "README.md").read_text()
    lines = {
        " ".join(line.split("#")[0].split()) for line in readme.replace("\\\n", " ").splitlines()
    }
    for cmd in main_job_commands():
        assert cmd in lines, f"README lacks the command behind a row of its table: {cmd}"
    assert all(shlex.split(c)[2].startswith("agents.") for c in main_job_commands())
