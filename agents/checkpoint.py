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

Only what is ours is ever replaced, renamed or deleted. Every folder a save makes carries
:data:`MARKER` from its first instant (before any other file), so a folder is ours when it holds
that marker (or the ``COMPLETE`` of a checkpoint written before the marker existed). A save goes
into a folder that is missing, empty or ours; a ``<folder>.tmp`` or ``<folder>.old`` that is not
ours is a user's own, and neither a save nor a load touches it (a save then stops with an error
naming it). A path that is a file or a symlink is refused, never renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

COMPLETE = "COMPLETE"
MARKER = ".textenvs-checkpoint"
"""Written first into every folder a save makes: what makes a folder one of ours."""
MARKER_TEXT = "textenvs checkpoint folder: saves may replace it, recovery may remove it\n"
LEGACY_COMPLETE_TEXT = "complete\n"
STAGES = ("written", "old_moved_aside", "new_in_place", "done")
"""The points of a save at which ``hook(stage)`` is called (tests kill the process there)."""


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def _read_small(path: Path) -> str | None:
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1024:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def is_ours(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a folder a textenvs save made (its :data:`MARKER`, or the
    ``COMPLETE`` file of a checkpoint written before the marker existed)."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    return (
        _read_small(folder / MARKER) == MARKER_TEXT
        or _read_small(folder / COMPLETE) == LEGACY_COMPLETE_TEXT
    )


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _remove_ours(path: Path) -> bool:
    """Remove ``path`` if it is ours (or an empty folder, which holds nothing to lose)."""
    if is_ours(path):
        shutil.rmtree(path)
        return True
    if _is_empty_dir(path):
        path.rmdir()
        return True
    return False


def check_save_target(folder: str | os.PathLike, leftovers: bool = True) -> Path:
    """Raise a ValueError, touching nothing, unless a save may write ``folder``: it is missing,
    an empty folder or ours, and (``leftovers``) its ``.tmp`` / ``.old`` names are free or ours."""
    folder = Path(folder)
    if folder.is_symlink():
        raise ValueError(
            f"{folder} is a symlink; a save replaces its folder by renames, so it writes only to "
            "a real path: give the path it points to, or another folder."
        )
    if folder.exists() and not folder.is_dir():
        raise ValueError(
            f"{folder} is a file, not a checkpoint folder; nothing was written. Give a folder "
            "path that is new, empty or a checkpoint saved before."
        )
    if folder.is_dir() and not _is_empty_dir(folder) and not is_ours(folder):
        raise ValueError(
            f"{folder} already holds files that are not a textenvs checkpoint (no {MARKER}); a "
            "save would replace them, so nothing was written. Give a new or empty folder."
        )
    for leftover in _leftovers(folder) if leftovers else ():
        if (leftover.exists() or leftover.is_symlink()) and not (
            is_ours(leftover) or _is_empty_dir(leftover)
        ):
            raise ValueError(
                f"{leftover} exists and is not a textenvs checkpoint; a save of {folder} uses "
                "that name for its work, so nothing was written. Move it, or save elsewhere."
            )
    return folder


def _leftovers(folder: Path) -> tuple[Path, Path]:
    return folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")


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
    exists. Only leftovers that are ours (:func:`is_ours`) are renamed or removed; a user's own
    ``<folder>.tmp`` or ``<folder>.old`` is left as it is.
    """
    folder = Path(folder)
    tmp, old = _leftovers(folder)
    if not folder.exists() and not folder.is_symlink():
        # Killed between the two renames: the new checkpoint (if complete) is newer than the old.
        for candidate in (tmp, old):
            if is_ours(candidate) and _is_complete(candidate):
                candidate.rename(folder)
                break
    for leftover in (tmp, old):
        if leftover.exists():
            _remove_ours(leftover)
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
    folder = check_save_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover(folder)
    tmp, old = _leftovers(folder)
    tmp.mkdir()
    (tmp / MARKER).write_text(MARKER_TEXT, encoding="utf-8")  # ours from its first instant
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
        _remove_ours(old)  # the previous checkpoint, or the empty folder the user gave
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
    # every process, before any waits for another; the others check the folder only: its .tmp
    # is process 0's to make, and they may look at it while process 0 is writing its marker
    # (a half-written marker read as "not ours" refused the save at random under load)
    folder = check_save_target(folder, leftovers=is_main)
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


def check_zip_sizes(path: str | os.PathLike, limit: Callable[[str], int], what: str) -> None:
    """Refuse, before inflating anything, a zip (``.npz``, ``.zip``) with a member larger than
    ``limit(name)`` bytes uncompressed (a small file can inflate to gigabytes)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable {what} ({e}).") from e
    for info in infos:
        if info.file_size > limit(info.filename):
            raise ValueError(
                f"{path}: member {info.filename!r} inflates to {info.file_size} bytes, more than "
                f"a {what} holds ({limit(info.filename)}); not read."
            )


def _call(hook: Callable[[str], None] | None, stage: str) -> None:
    if hook is not None:
        hook(stage)


def replace_file_atomically(
    path: str | os.PathLike,
    write: Callable[[Path], None],
    hook: Callable[[str], None] | None = None,
) -> Path:
    """Write one file through ``<path>.tmp`` and an atomic rename: the old or the new file, never
    half. The caller checks that an existing ``path`` is one of its own files; a folder, a
    symlink, or a ``<path>.tmp`` that is not a plain file is refused untouched.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    for p in (path, tmp):
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise ValueError(
                f"{p} is a folder or a symlink; a save writes a plain file there, so nothing was "
                "written. Give another path."
            )
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    _call(hook, "written")
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    _call(hook, "done")
    return path
