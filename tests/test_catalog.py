"""``python -m textenvs list`` / ``describe ID``: the ids and what each one is, with no download."""

from __future__ import annotations

import subprocess
import sys

import gymnasium as gym
import pytest

import textenvs
from textenvs import catalog
from textenvs.__main__ import main


def test_list_prints_every_registered_id_with_its_kind(capsys):
    main(["list"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == textenvs.ENV_IDS
    kinds = {line.split()[0]: line.split()[1] for line in lines}
    assert kinds["textenvs/EditSummary-v0"] == "edit"
    assert kinds["textenvs/Dialogue-v0"] == "dialogue"
    assert kinds["textenvs/XSum-v0"] == "generation"


def test_list_offline_leaves_out_the_hub_ids(capsys):
    main(["list", "--offline"])
    ids = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "textenvs/Summarize-v0" in ids and "textenvs/Dialogue-v0" in ids
    assert not set(ids) & set(textenvs.BENCHMARK_IDS)
    assert "textenvs/DailyDialog-v0" not in ids


@pytest.mark.parametrize("env_id", textenvs.ENV_IDS)
def test_every_id_has_a_summary_and_its_facts(env_id):
    rows = dict(catalog.facts(env_id))
    assert rows["what"] == catalog.SUMMARIES[env_id]
    assert rows["entry point"] == gym.spec(env_id).entry_point
    assert env_id.split("/")[1] in rows["docs"]


def test_describe_a_benchmark_id_needs_no_dataset_and_names_its_hub_dataset(capsys):
    main(["describe", "textenvs/XSum-v0"])
    out = capsys.readouterr().out
    assert "EdinburghNLP/xsum" in out and "document, summary" in out and "rougeL" in out
    assert "offline:            no" in out


def test_describe_spaces_makes_a_builtin_env(capsys):
    main(["describe", "textenvs/Summarize-v0", "--spaces"])
    out = capsys.readouterr().out
    env = gym.make("textenvs/Summarize-v0")
    assert f"action space:       {env.action_space}" in out
    assert f"observation space:  {env.observation_space}" in out


def test_an_unknown_id_is_one_line_error_naming_the_list_command():
    out = subprocess.run(
        [sys.executable, "-m", "textenvs", "describe", "textenvs/Sumarize-v0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: 'textenvs/Sumarize-v0' is not a textenvs id")
    assert "python -m textenvs list" in out.stderr and "Traceback" not in out.stderr
