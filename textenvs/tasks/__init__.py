"""Tasks: samples per split and the prompt template that turns a source into the text the LM
continues.

* :mod:`textenvs.tasks.base`: :class:`Sample` and :class:`Task`;
* :mod:`textenvs.tasks.builtin`: the two built-in task generators (``summarize``, ``translate``);
* :mod:`textenvs.tasks.loaders`: JSON Lines / CSV files, Hugging Face ``datasets``, lists of
  samples.

:func:`resolve_task` is what the environments call with their ``task`` / ``dataset`` arguments.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from textenvs.tasks.base import SPLITS, Sample, Task
from textenvs.tasks.builtin import (
    BUILTIN_TASKS,
    SPLIT_SIZES,
    builtin_task,
    generate_samples,
    unpaired_texts,
)
from textenvs.tasks.loaders import (
    DatasetFormatError,
    load_csv,
    load_dataset,
    load_hf_dataset,
    load_jsonl,
    task_from_samples,
)


def resolve_task(
    task: str | Task | None,
    dataset: str | os.PathLike | Sequence[Sample] | Task | None,
    dataset_kwargs: dict[str, Any] | None,
) -> Task:
    """The Task an env runs: ``dataset=`` (file, ``hf:NAME``, samples) wins over ``task=``."""
    if dataset is not None:
        return load_dataset(dataset, **(dataset_kwargs or {}))
    if isinstance(task, Task):
        return task
    return builtin_task(task or "summarize")


__all__ = [
    "BUILTIN_TASKS",
    "SPLITS",
    "SPLIT_SIZES",
    "DatasetFormatError",
    "Sample",
    "Task",
    "builtin_task",
    "generate_samples",
    "load_csv",
    "load_dataset",
    "load_hf_dataset",
    "load_jsonl",
    "resolve_task",
    "task_from_samples",
    "unpaired_texts",
]
