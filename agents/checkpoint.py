"""Crash-consistent checkpoint folders: at every instant of a save, a complete checkpoint is
loadable.

A save writes the new checkpoint into ``<folder>.tmp``, marks it complete (a ``COMPLETE`` file
written last, after every file is flushed to disk), then swaps it in with renames::

    write <folder>.tmp, fsync, COMPLETE     (the previous <folder> untouched)
    rename <folder>      -> <folder>.old    (the previous checkpoint, complete, under another name)
    rename <folder>.tmp  -> <folder>        (the new one in place)
    remove <folder>.old

A process killed at any point leaves either ``<folder>`` complete, or no ``<folder>`` but a complete
``<folder>.old`` or ``<folder>.tmp``. :func:`recover` (run by every save and every load) puts the
newest complete one back in place and removes what is left of an interrupted save, so a later save
never trips over leftovers and a load never finds nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

COMPLETE = "COMPLETE"
STAGES = ("written", "old_moved_aside", "new_in_place", "done")
"""The points of a save at which ``hook(stage)`` is called (tests kill the process there)."""


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(folder: str | os.PathLike) -> Path | None:
    """Finish or undo an interrupted save of ``folder``; the complete checkpoint, or None if none
    exists.
    """
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    if not folder.exists():
        # Killed between the two renames: the new checkpoint (if complete) is newer than the old.
        for candidate in (tmp, old):
            if candidate.exists() and _is_complete(candidate):
                candidate.rename(folder)
                break
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    return folder if folder.exists() else None


def save_atomically(
    folder: str | os.PathLike,
    write: Callable[[Path], None],
    hook: Callable[[str], None] | None = None,
) -> Path:
    """Save a checkpoint folder so that a crash at any instant leaves a complete one loadable.

    Args:
        folder: The checkpoint folder.
        write: Writes every file of the checkpoint into the folder it is given.
        hook: Called with each stage of :data:`STAGES` (tests kill the process there).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    tmp.mkdir()
    write(tmp)
    (tmp / COMPLETE).write_text("complete\n")
    _fsync_tree(tmp)
    _call(hook, "written")
    if folder.exists():
        folder.rename(old)
        _call(hook, "old_moved_aside")
    tmp.rename(folder)
    _fsync_dir(folder.parent)
    _call(hook, "new_in_place")
    if old.exists():
        shutil.rmtree(old)
    _call(hook, "done")
    return folder


def save_atomically_together(
    folder: str | os.PathLike,
    write_part: Callable[[Path], None],
    write_rest: Callable[[Path], None],
    is_main: bool,
    barrier: Callable[[], None],
    hook: Callable[[str], None] | None = None,
) -> Path:
    """:func:`save_atomically` for a checkpoint that every process writes a part of (sharded
    training): every process calls it at once. Process 0 makes ``<folder>.tmp``; every process
    writes its part into it (``write_part``, which may be collective); process 0 then writes the
    rest, marks it complete and swaps it in as :func:`save_atomically` does. The folder must be
    on a file system every process sees. A crash at any instant leaves a complete checkpoint, as
    there: ``COMPLETE`` is written only after every part.
    """
    folder = Path(folder)
    if not is_main:
        barrier()  # process 0 has made <folder>.tmp
        write_part(folder.with_name(folder.name + ".tmp"))
        barrier()  # every part is written
        barrier()  # process 0 has marked the checkpoint complete and swapped it in
        return folder

    def write(tmp: Path) -> None:
        barrier()
        write_part(tmp)
        barrier()
        write_rest(tmp)

    save_atomically(folder, write, hook)
    barrier()
    return folder


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from ``path``; a ValueError naming the file for anything unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable {what} ({e}).") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


def _call(hook: Callable[[str], None] | None, stage: str) -> None:
    if hook is not None:
        hook(stage)


def replace_file_atomically(
    path: str | os.PathLike,
    write: Callable[[Path], None],
    hook: Callable[[str], None] | None = None,
) -> Path:
    """Write one file through ``<path>.tmp`` and an atomic rename: the old or the new file, never
    half.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    _call(hook, "written")
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    _call(hook, "done")
    return path
