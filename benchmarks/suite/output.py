"""The suite's output folder: one run at a time (a lock), what a run records and a ``--resume``
must match (``run.json``), the finished cells (``cells.jsonl``, a torn last line recovered), the
package versions of the report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from benchmarks.suite.settings import LAST_BLOCK, Budget, token_ppo_settings
from textenvs.cli import CommandLineError

LOCK_NAME = ".lock"


def lock_output_folder(out: Path):
    """An exclusive lock on ``out`` for this process: a second run on that folder fails at once."""
    import fcntl

    handle = (out / LOCK_NAME).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise CommandLineError(
            f"{out} is in use by another suite run ({owner}): wait for it to finish, or pass "
            "another --out."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def recorded_settings(budget: Budget, args: argparse.Namespace) -> dict:
    """What a run records in ``run.json`` and a ``--resume`` must match: the budget, the model, the
    env arguments and token PPO's effective settings (the suite's ``TOKEN_PPO`` are code, not
    budget: cells trained before a change of them must not be mixed with cells trained after)."""
    return {
        "budget": asdict(budget),
        "model": args.model,
        "env_kwargs": args.env_kwargs,
        "last_block": LAST_BLOCK,
        "token_ppo": {
            "translate": token_ppo_settings(budget, "translate"),
            "other": token_ppo_settings(budget, None),
        },
    }


def check_recorded_run(path: Path, record: dict) -> None:
    """Record the budget of a new run; refuse to add cells of another budget to a recorded one."""
    if not path.exists():
        path.write_text(json.dumps(record, indent=1))
        return

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in d.items():
            out.update(
                flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}
            )
        return out

    recorded, now = flat(json.loads(path.read_text())), flat(json.loads(json.dumps(record)))
    changed = sorted(k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k))
    if changed:
        raise CommandLineError(
            f"{path.parent} holds a run with another budget ({', '.join(changed)} differ from "
            f"{path}): resume with the same --quick/--full, --scale, --seeds and overrides, or "
            "pass another --out (token_ppo.* also differ when the code's token-PPO settings, "
            "TOKEN_PPO in benchmarks/run.py, changed since the run began)."
        )


def load_cells(raw: Path) -> list[dict]:
    """The finished cells of ``cells.jsonl``; a torn last line (a killed run) is dropped, warned."""
    if not raw.exists():
        return []
    lines = raw.read_text().splitlines()
    cells, seen = [], set()
    for number, line in enumerate(lines, 1):
        try:
            cell = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise CommandLineError(
                    f"{raw}, line {number}: not a JSON record; fix or delete the line."
                ) from None
            print(
                f"warning: {raw}, line {number} is a torn record (the run was killed while writing "
                "it): dropped, its cell runs again",
                file=sys.stderr,
            )
            raw.write_text("".join(f"{line}\n" for line in lines[:-1]))
            break
        key = (cell["agent"], cell["env_id"], cell["seed"])
        if key not in seen:  # a cell is counted once, whatever happened to the file
            seen.add(key)
            cells.append(cell)
    return cells


def commit() -> str | None:
    """The short git commit of the checkout this runs from (``-dirty`` with uncommitted changes
    to tracked files), or None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        run = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        return run.stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha or None


def versions() -> dict:
    import importlib.metadata as md

    out = {"commit": commit()}
    for name in (
        "textenvs",
        "torch",
        "transformers",
        "gymnasium",
        "stable-baselines3",
        "sb3-contrib",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out
