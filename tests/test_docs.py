"""The documentation is part of the product: the site builds with warnings as errors, every Python
code block of the README and the docs runs as written, every command of their shell blocks parses
with the command line it names.

Python blocks of one page run in order in one namespace (a page reads top to bottom), in a
temporary folder holding the two files the pages name as a user's own: ``my_data.jsonl`` and the
``save_pretrained`` folder ``my_model/``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _pages() -> list[Path]:
    sys.path.insert(0, str(DOCS))
    try:
        import conf  # the site's own generator of the per-id pages
    finally:
        sys.path.remove(str(DOCS))
    conf.write_env_pages()
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


PAGES = [p for p in _pages() if "_build" not in p.parts]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.M | re.S)


def blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == language]


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.fixture
def user_files(tmp_path, monkeypatch, random_gpt2_dir):
    import shutil

    rows = [
        {"source": f"Sentence number {i} of a small corpus.", "references": [f"Sentence {i}"]}
        for i in range(12)
    ]
    (tmp_path / "my_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(random_gpt2_dir, tmp_path / "my_model")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Sphinx 9 flags its own extensions' (napoleon's, MyST's) uses of APIs it will change in Sphinx 11
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_the_docs_build_with_warnings_as_errors(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    from sphinx.cmd.build import build_main

    status = build_main(["-W", "-E", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")])
    assert status == 0
    html = tmp_path / "html"
    assert (html / "envs" / "Summarize-v0.html").exists()
    assert "Action Space" in (html / "envs" / "EditSummary-v0.html").read_text()
    assert (html / "api.html").stat().st_size > 10_000


def test_every_env_id_has_a_page():
    import textenvs

    pages = {p.stem for p in (DOCS / "envs").glob("*.md")}
    assert {env_id.split("/")[1] for env_id in textenvs.ENV_IDS} <= pages


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=lambda p: _rel(p))
def test_python_blocks_run_as_written(page, user_files):
    namespace: dict = {"__name__": "__docs__"}
    for i, code in enumerate(blocks(page, "python")):
        try:
            exec(compile(code, f"{_rel(page)} block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{_rel(page)}: python block {i + 1} failed:\n{code}") from e


class _Parsed(BaseException):  # not an Exception: no CLI's error handling catches it
    pass


CONSOLE_SCRIPTS = {
    "textenvs": "textenvs.__main__",
    "textenvs-bench": "benchmarks.run",
    "textenvs-rate": "textenvs.rate.__main__",
    "textenvs-throughput": "benchmarks.throughput",
    "textenvs-train-tiny": "textenvs.models.train_tiny",
}


def commands(page: Path) -> list[tuple[str, list[str]]]:
    """``(module or script, arguments)`` of every command of the page's shell blocks that runs
    one of ours (``python -m ...``, ``python examples/...``, a console script, or
    ``accelerate launch ... -m ...``); pip and pytest lines are not ours to parse."""
    out = []
    for body in blocks(page, "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if not words:
                    continue
                if words[0] in CONSOLE_SCRIPTS:
                    out.append((CONSOLE_SCRIPTS[words[0]], words[1:]))
                elif "-m" in words and words[0] in ("python", "accelerate", "torchrun"):
                    at = words.index("-m")
                    if words[at + 1] not in ("pytest", "pip", "sphinx"):
                        out.append((words[at + 1], words[at + 2 :]))
                elif words[0] == "python" and len(words) > 1 and words[1].endswith(".py"):
                    out.append((words[1], words[2:]))
    return out


@pytest.mark.parametrize("page", [p for p in PAGES if commands(p)], ids=lambda p: _rel(p))
def test_shell_commands_parse(page, monkeypatch):
    """Each command's arguments parse with its own parser (it is stopped right after parsing, so
    nothing trains); an unknown or misspelt flag fails here."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for target, args in commands(page):
        if target.endswith(".py"):  # an example script: its main(argv)
            main = runpy.run_path(str(ROOT / target), run_name="__docs__")["main"]
        else:  # our command lines all take main(argv); `python -m package` runs its __main__
            module = importlib.import_module(target)
            if not hasattr(module, "main"):
                module = importlib.import_module(f"{target}.__main__")
            main = module.main
        monkeypatch.setattr(sys, "argv", [target, *args])  # for a main() that reads sys.argv
        try:
            main(args) if inspect.signature(main).parameters else main()
        except _Parsed:
            continue
        except SystemExit as e:
            command = f"{target} {shlex.join(args)}"
            raise AssertionError(f"{_rel(page)}: `{command}` exited {e.code}") from e
        raise AssertionError(f"{_rel(page)}: `{target}` parsed no arguments")


def test_readme_fits_a_screen_or_two():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 230


def test_every_figure_in_the_docs_names_the_command_that_made_it():
    """An image in a page is preceded, within the 12 lines above it, by the command that made it."""
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.lstrip().startswith("!["):
                above = "\n".join(lines[max(0, i - 12) : i])
                assert re.search(r"python -m \w+|textenvs-\w+", above), (_rel(page), line)
