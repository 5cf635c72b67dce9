"""Every command line reports a user error as one line, ``error: ...``, with exit status 2, and a
bug with its traceback (textenvs.cli.run_cli)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from textenvs.cli import CommandLineError, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = json.dumps({"dataset": "/nonexistent/data.jsonl"})


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TEXTENVS_TRACEBACK": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("agents.token_ppo", "--resume", "{empty}"), "checkpoint"),
        (("agents.sb3", "--env-id", "textenvs/Nope-v0"), "Nope"),
        (("agents.qlearning", "--env-id", "textenvs/Summarize-v0", "--k", "0"), "k"),
        (
            ("benchmarks.run", "--quick", "--env-kwargs", MISSING, "--out", "{empty}/out"),
            "nonexistent",
        ),
        (("benchmarks.throughput", "--model", "{empty}/no-model"), "not a folder here"),
        (("benchmarks.compare_trl", "--reward", "nope"), "unknown --reward"),  # argparse's own
    ],
    ids=["token_ppo", "sb3", "qlearning", "run", "throughput", "compare_trl"],
)
def test_a_user_error_is_one_line_and_exit_status_2(tmp_path, argv, says):
    argv = [a.replace("{empty}", str(tmp_path)) for a in argv]
    result = _run(*argv)
    assert result.returncode == 2, result.stderr[-2000:]
    # ours: "error: ..."; argparse's: "prog: error: ..."
    lines = [x for x in result.stderr.splitlines() if x.startswith("error: ") or ": error: " in x]
    assert len(lines) == 1 and says in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_bug_keeps_its_traceback_and_user_errors_can_show_theirs(monkeypatch, capsys):
    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_cli(bug)

    def mistake():
        raise ValueError("k must be\n an int")

    with pytest.raises(SystemExit) as stop:
        run_cli(mistake)
    assert stop.value.code == 2 and capsys.readouterr().err == "error: k must be an int\n"
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: (_ for _ in ()).throw(CommandLineError("out in use")))
    assert stop.value.code == 2 and capsys.readouterr().err == "error: out in use\n"
    monkeypatch.setenv("TEXTENVS_TRACEBACK", "1")
    with pytest.raises(ValueError):
        run_cli(mistake)


BAD_FLAGS = [
    ("agents.token_ppo", "--total-episodes", "-5"),
    ("agents.token_ppo", "--eval-samples", "-1"),
    ("agents.token_ppo", "--kl-coef", "nan"),
    ("agents.token_ppo", "--gamma", "inf"),
    ("agents.token_ppo", "--learning-rate", "inf"),
    ("agents.token_ppo", "--gae-lambda", "nan"),
    ("agents.token_ppo", "--max-new-tokens", "0"),
    ("agents.token_ppo", "--env-kwargs", "[1]"),
    ("agents.sb3", "--total-steps", "-5"),
    ("agents.sb3", "--kl-coef", "nan"),
    ("agents.sb3", "--gae-lambda", "inf"),
    ("agents.sb3", "--max-steps", "0"),
    ("agents.qlearning", "--total-steps", "0"),
    ("agents.qlearning", "--learning-rate", "nan"),
    ("agents.ray_rollouts", "--total-episodes", "-1"),
    ("benchmarks.run", "--seeds", "0"),
    ("benchmarks.run", "--scale", "nan"),
    ("benchmarks.run", "--eval-samples", "-1"),
    ("benchmarks.throughput", "--episodes", "-1"),
    ("benchmarks.scale", "--iterations", "0"),
    ("benchmarks.workloads", "--steps", "-1"),
    ("benchmarks.compare_trl", "--kl-coef", "-inf"),
    ("benchmarks.memory", "--size-mb", "0"),
    ("textenvs.models.train_tiny", "--vocab-size", "0"),
    ("textenvs.models.train_tiny", "--d-model", "0"),
]


@pytest.mark.parametrize(("module", "flag", "value"), BAD_FLAGS)
def test_every_bad_count_or_number_is_refused_by_its_flag_before_any_work(
    capsys, module, flag, value
):
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_:
        main([flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if ": error: " in x]
    assert len(lines) == 1 and f"argument {flag}:" in lines[0], err
    assert "Traceback" not in err


def test_a_save_path_of_someone_elses_files_is_refused_before_training(tmp_path, capsys):
    from agents import qlearning, sb3, token_ppo

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "table.npz").write_text("keep")
    for main, argv in (
        (sb3.main, ["--save", str(tmp_path / "mine")]),
        (token_ppo.main, ["--checkpoint-dir", str(tmp_path / "mine")]),
        (token_ppo.main, ["--export", str(tmp_path / "mine")]),
        (qlearning.main, ["--save", str(tmp_path / "table.npz")]),
    ):
        with pytest.raises(ValueError, match="not a textenvs checkpoint|not a Q-learning save"):
            main([*argv, "--total-steps" if main is not token_ppo.main else "--seed", "1"])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert (tmp_path / "table.npz").read_text() == "keep"
