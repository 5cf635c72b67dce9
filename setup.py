"""Metadata lives in setup.cfg; this file only installs the id-registration hook.

``textenvs-gymnasium-ids.pth`` goes to the root of site-packages (next to the packages) in wheel
and editable installs alike, so that every process that imports gymnasium resolves our ids (see
``_textenvs_gymnasium_hook.py``). ``pip uninstall textenvs`` removes it with the rest.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

HOOK_FILE = "textenvs-gymnasium-ids.pth"


class BuildPyWithIdHook(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            # Editable installs keep packages in the checkout; what the install command writes
            # to its target (the editable wheel's root) lands in site-packages.
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        self.copy_file(HOOK_FILE, os.path.join(target, HOOK_FILE))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, HOOK_FILE)]


setup(cmdclass={"build_py": BuildPyWithIdHook})
