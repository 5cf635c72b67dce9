"""Every script of ``examples/`` runs at a tiny budget, in a fresh process as a user runs it, so
the examples cannot rot (the docs include them as they are)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_ARGS = {
    "random_policy.py": ["--episodes", "1"],
    "sb3_ppo.py": ["--total-steps", "256", "--eval-episodes", "2"],
    "maskable_ppo_edit.py": ["--total-steps", "128"],
    "cleanrl_style.py": ["--iterations", "2", "--num-envs", "2", "--num-steps", "8"],
    "torchrl_rollout.py": ["--steps", "4"],
    "tianshou_dqn.py": ["--epoch-steps", "20"],
    "token_ppo.py": ["--total-episodes", "32", "--eval-samples", "4"],
    "own_dataset.py": ["--out", "{tmp}/my_data.jsonl"],
    "dialogue_data.py": ["--conversations", "2"],
    "dialogue_lm_user.py": ["--conversations", "2", "--turns", "2"],
    "dialogue_scripted.py": ["--episodes", "1"],
}
NEEDS = {
    "torchrl_rollout.py": "torchrl",
    "tianshou_dqn.py": "tianshou",
    "sb3_ppo.py": "sb3_contrib",
    "maskable_ppo_edit.py": "sb3_contrib",
}


def test_every_example_has_a_tiny_budget():
    assert {p.name for p in (ROOT / "examples").glob("*.py")} == set(TINY_ARGS)


@pytest.mark.parametrize("script", sorted(TINY_ARGS))
def test_example_runs(script, tmp_path):
    if script in NEEDS:
        pytest.importorskip(NEEDS[script])
    args = [a.format(tmp=tmp_path) for a in TINY_ARGS[script]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()  # each example reports what it did
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("script", sorted(TINY_ARGS))
def test_example_help_is_whole_sentences_with_every_default(script, capsys, monkeypatch):
    """``--help``: the docstring's whole first paragraph, and every flag its help and default."""
    import argparse
    import runpy

    if script in NEEDS:
        pytest.importorskip(NEEDS[script])
    parsers = []
    original = argparse.ArgumentParser.parse_args

    def keep(self, *args, **kwargs):
        parsers.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", keep)
    main = runpy.run_path(str(ROOT / "examples" / script), run_name="__docs__")["main"]
    with pytest.raises(SystemExit) as stopped:
        main(["--help"])
    assert stopped.value.code == 0
    (parser,) = parsers
    assert parser.description.endswith(".") and "\n" not in parser.description
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, f"{script}: {action.option_strings} has no help"
    assert "(default:" in capsys.readouterr().out
