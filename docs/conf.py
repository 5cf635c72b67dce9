"""Sphinx configuration of the textenvs documentation.

Build: ``pip install -e ".[docs]"`` then ``python -m sphinx -W -b html docs docs/_build/html``
(``tests/test_docs.py`` builds it with warnings as errors). One page per registered env id is
written into ``docs/envs/`` at build time from the registry and the env classes' docstrings, as
gymnasium.farama.org's env pages are.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import textenvs  # noqa: E402  (registers the ids)

project = "textenvs"
copyright = "2026, the textenvs developers (Apache-2.0)"
author = "the textenvs developers"
release = version = textenvs.__version__
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"textenvs {release}"
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_inherit_docstrings = False  # gymnasium's own step / reset docstrings are not ours
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# autodoc imports these lazily-loaded clients only where installed
autodoc_mock_imports = ["ray", "peft", "accelerate", "trl", "bert_score"]

from textenvs.catalog import SUMMARIES, first_episode  # noqa: E402  (one line per id, shared with the CLI)


def _markdown_docstring(doc: str) -> str:
    """An env class docstring (``## Section`` headings, RST roles) as MyST Markdown."""
    lines = doc.expandtabs().split("\n")
    indent = min((len(line) - len(line.lstrip()) for line in lines[1:] if line.strip()), default=0)
    text = "\n".join([lines[0].strip()] + [line[indent:] for line in lines[1:]])
    # :class:`~x.Y` -> {py:class}`~x.Y` (MyST's role syntax)
    return re.sub(r":(class|meth|func|mod|attr):`([^`]+)`", r"{py:\1}`\2`", text)


def write_env_pages(app=None) -> list[Path]:
    """``docs/envs/<Name>.md`` for every registered id and the ``docs/envs/index.md`` table."""
    import gymnasium as gym

    from textenvs.tasks.hub import BENCHMARKS, DIALOGUE_BENCHMARKS

    folder = Path(__file__).parent / "envs"
    folder.mkdir(exist_ok=True)
    written, rows = [], []
    for env_id in textenvs.ENV_IDS:
        spec = gym.spec(env_id)
        name = env_id.split("/")[1]
        module, cls_name = spec.entry_point.split(":")
        cls = getattr(__import__(module, fromlist=[cls_name]), cls_name)
        table = [
            ("Id", f"`{env_id}`"),
            ("Entry point", f"`{spec.entry_point}`"),
            ("Vector entry point", f"`{spec.vector_entry_point}` (`gym.make_vec(id, num_envs=N)`)"),
            ("Registered kwargs", f"`{spec.kwargs}`" if spec.kwargs else "none"),
        ]
        task = spec.kwargs.get("task")
        example = None
        if env_id in textenvs.BENCHMARK_IDS or task in DIALOGUE_BENCHMARKS:
            bench = {**BENCHMARKS, **DIALOGUE_BENCHMARKS}[task]
            splits = bench.splits.items()
            hub = f"`{bench.path}`" + (f" (`{bench.config}`)" if bench.config else "")
            table += [
                ("Hub dataset", hub),
                ("Columns", ", ".join(f"`{c}`" for c in bench.columns)),
                ("Splits", ", ".join(f"{k}: `{v[0]}` {v[1]:g}-{v[2]:g}" for k, v in splits)),
                ("Prompt", f"`{bench.prompt_template!r}`"),
                ("Default reward", f"`{bench.default_reward}`"),
                ("Spaces", "`Discrete(V)` / `Box(d,)` of the model (GPT-2: V 50257, d 768)"),
            ]
            usage = (
                'Needs the dataset (`pip install -e ".[hub]"` and network, or local files in '
                'the hub\'s schema through `dataset_kwargs={"data_files": ...}`) and a model '
                "(`model=`, default `gpt2`): see [Data and models](../guides/data-and-models.md)."
            )
        else:
            made = first_episode(env_id)
            table += [
                ("Action space", f"`{made['action_space']}`"),
                ("Observation space", f"`{made['observation_space']}`"),
                (
                    "Reward",
                    f"`{made['reward']}`, {'dense' if made['dense'] else 'at the end'}, "
                    f"at most {made['max_steps']} steps",
                ),
            ]
            example = (
                'The first test episode (`reset(seed=0)` on `split="test"`): what the model '
                "reads, and the reference it is scored against.\n\n"
                f"```text\n{made['prompt'].strip()}\n```\n\nReference:\n\n"
                f"```text\n{made['reference'].strip()}\n```\n"
            )
            usage = (
                "```python\nimport gymnasium as gym\n\n"
                f'env = gym.make("{env_id}")\nobs, info = env.reset(seed=0)\n'
                "obs, reward, terminated, truncated, info = env.step(env.action_space.sample())\n"
                "```\n\n(the tiny built-in model and the built-in task when `task=` is given, "
                "offline; spaces with the defaults)"
            )
        shared = [i for i in textenvs.ENV_IDS if gym.spec(i).entry_point == spec.entry_point]
        body = [
            f"# {env_id}\n",
            SUMMARIES[env_id] + "\n",
            "| | |\n|---|---|",
            *[f"| {k} | {v} |" for k, v in table],
            "",
            usage + "\n",
            *(["## An episode\n", example] if example else []),
            f"## The `{cls.__name__}` class\n",
            f"What every one of the {len(shared)} ids of this class shares: its arguments "
            "(the keyword arguments of `gym.make`), spaces, rewards and episode end.\n",
            _markdown_docstring(cls.__doc__).replace("\n## ", "\n### "),
        ]
        page = folder / f"{name}.md"
        _write(page, "\n".join(body) + "\n")
        written.append(page)
        rows.append(f"| [`{env_id}`]({name}.md) | {SUMMARIES[env_id]} |")
    index = folder / "index.md"
    _write(
        index,
        "# Environments\n\nEvery registered id, one page each (generated from the registry and "
        "the env class's docstring).\n\n| id | what |\n|---|---|\n"
        + "\n".join(rows)
        + "\n\n```{toctree}\n:hidden:\n\n"
        + "\n".join(p.stem for p in written)
        + "\n```\n",
    )
    return [*written, index]


def _write(path: Path, text: str) -> None:
    """Replace ``path`` atomically: parallel test workers generate the pages at once."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def markdown_sections(app, what, name, obj, options, lines) -> None:
    """The env classes' docstrings use Markdown section headings (``## Action Space``), as
    Gymnasium's do; in the API reference they become rubrics."""
    out = []
    for line in lines:
        out += [f".. rubric:: {line[3:]}", ""] if line.startswith("## ") else [line]
    lines[:] = out


def setup(app):
    app.connect("builder-inited", write_env_pages)
    app.connect("autodoc-process-docstring", markdown_sections)
