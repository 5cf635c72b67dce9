"""Registers textenvs' Gymnasium ids in every process that imports gymnasium.

Gymnasium 1.x has no plugin entry points, so a worker process that never imports textenvs
(SB3's SubprocVecEnv under spawn or forkserver, Ray env runners, TorchRL's parallel envs) cannot
resolve ``"textenvs/Summarize-v0"``. The installed ``textenvs-gymnasium-ids.pth`` imports this
module at interpreter start-up; it only puts a finder on ``sys.meta_path`` that waits for
``gymnasium`` to be imported and then imports the light ``textenvs`` package, which registers
the ids (torch and transformers load later, when an env is made). A process that never imports
gymnasium pays nothing else. Set ``TEXTENVS_NO_AUTOREGISTER=1`` to switch the hook off.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType


def _register_textenvs_ids() -> None:
    try:
        import textenvs  # noqa: F401  (registers the ids)
    except Exception as error:  # a broken install must not break every `import gymnasium`
        warnings.warn(
            f"textenvs could not register its Gymnasium ids ({error!r}); run `import textenvs` "
            "to see the full error, or set TEXTENVS_NO_AUTOREGISTER=1 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )


class _AfterGymnasiumImport(MetaPathFinder):
    """Finds nothing itself; wraps gymnasium's own loader so that the ids register after it.

    It stays on ``sys.meta_path`` through look-ups that do not import (``importlib.util.find_spec``,
    which TorchRL and others call to probe for gymnasium) and leaves only once gymnasium's module
    has been executed, so the real import that comes later still registers the ids.
    """

    def __init__(self) -> None:
        self._looking_up = False  # our own look-up below must not come back here

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "gymnasium" or self._looking_up:
            return None
        self._looking_up = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._looking_up = False
        if spec is None or spec.loader is None:
            return spec
        execute_gymnasium = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute_gymnasium(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)  # done: gymnasium is imported
            _register_textenvs_ids()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Called by the .pth line; does nothing when switched off or when gymnasium is loaded."""
    if os.environ.get("TEXTENVS_NO_AUTOREGISTER", "") not in ("", "0"):
        return
    if "gymnasium" in sys.modules:
        _register_textenvs_ids()
    elif not any(isinstance(finder, _AfterGymnasiumImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterGymnasiumImport())
