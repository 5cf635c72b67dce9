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
