"""Where a training command writes when it is told nothing: a fresh folder per run.

``python -m agents.sb3``, ``agents.qlearning`` and ``agents.token_ppo`` save what they trained by
default, into ``<runs>/<agent>/<env name>/<YYYYmmdd-HHMMSS>`` (``runs`` under the working folder,
or ``--runs-dir``, or the ``TEXTENVS_RUNS`` environment variable), and print the folder and how to
load it. The folder is created when the run starts, by a ``mkdir`` that fails on an existing path,
so a run never writes into a folder that was there before (two runs started in the same second get
``...-1``, ``...-2``). ``--save`` / ``--export`` name the target instead; ``--no-save`` writes
nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

RUNS_ENV = "TEXTENVS_RUNS"
DEFAULT_RUNS = "runs"


def runs_root() -> Path:
    """``$TEXTENVS_RUNS`` if set, else ``runs`` under the working folder."""
    return Path(os.environ.get(RUNS_ENV) or DEFAULT_RUNS)


def env_folder_name(env_id: str) -> str:
    """``textenvs/Summarize-v0`` -> ``Summarize-v0``; any other id made safe for a folder name."""
    name = env_id.rsplit("/", 1)[-1] if env_id.startswith("textenvs/") else env_id
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "env"


def new_run_folder(agent: str, env_id: str, root: str | os.PathLike | None = None) -> Path:
    """Create and return a new ``<root>/<agent>/<env name>/<time>`` folder (never an existing
    one: ``-1``, ``-2``, ... are appended until a ``mkdir`` succeeds)."""
    parent = Path(root if root is not None else runs_root()) / agent / env_folder_name(env_id)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(10_000):
        folder = parent / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise OSError(f"no free run folder name under {parent} for {stamp}; give --save or --runs-dir")


def add_output_flags(p: argparse.ArgumentParser, agent: str) -> None:
    """``--runs-dir`` and ``--no-save``: where a run writes when its explicit target flag is not
    given, or that it writes nothing."""
    p.add_argument(
        "--runs-dir",
        default=None,
        help=f"where a run saves when no target is given: a new <runs-dir>/{agent}/<env>/<time> "
        f"folder (default: ${RUNS_ENV}, else ./{DEFAULT_RUNS})",
    )
    p.add_argument("--no-save", action="store_true", help="save nothing (default: save)")


def run_folder(
    p: argparse.ArgumentParser, args: argparse.Namespace, agent: str, target: str | None
) -> Path | None:
    """The folder this run writes into when ``target`` (its ``--save`` / ``--export``) is not
    given: a new run folder, or None with ``--no-save``. Refuses ``--no-save`` with a target."""
    if args.no_save:
        if target:
            p.error("--no-save contradicts the save target given; drop one of them")
        return None
    if target:
        return None
    return new_run_folder(agent, args.env_id, args.runs_dir)
