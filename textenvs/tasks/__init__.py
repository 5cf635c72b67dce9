"""Tasks: samples per split and the prompt template that turns a source into the text the LM
continues.

* :mod:`textenvs.tasks.base`: :class:`Sample` and :class:`Task`;
* :mod:`textenvs.tasks.builtin`: the two built-in task generators (``summarize``, ``translate``);
* :mod:`textenvs.tasks.loaders`: JSON Lines / CSV files, Hugging Face ``datasets``, lists of
  samples;
* :mod:`textenvs.tasks.hub`: the benchmark datasets of RL-for-LM papers (CNN/DM, XSum, WMT16,
  IMDB, CommonGen) from the hub, or from local files in their schema.

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
from textenvs.tasks.hub import BENCHMARKS, DatasetUnavailableError, benchmark_task
from textenvs.tasks.loaders import (
    DatasetFormatError,
    file_stamp,
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
    """The Task an env runs: ``dataset=`` (file, ``hf:NAME``, samples) wins over ``task=``.

    ``task`` is a built-in task (``summarize``, ``translate``), a benchmark of
    :data:`~textenvs.tasks.hub.BENCHMARKS` (``cnn_dailymail``, ..., configured by
    ``dataset_kwargs``) or a :class:`Task`.
    """
    if dataset_kwargs is not None and not isinstance(dataset_kwargs, dict):
        raise ValueError(
            f"dataset_kwargs must be a dict of keyword arguments (e.g. {{'data_files': ...}}), "
            f"got {type(dataset_kwargs).__name__} {dataset_kwargs!r}."
        )
    if dataset is not None:
        return load_dataset(dataset, **(dataset_kwargs or {}))
    if isinstance(task, Task):
        return task
    if task in BENCHMARKS:
        kwargs = dataset_kwargs or {}
        # the local files' stamps too, as for dataset= files: an edited file is read again
        key = (task, repr(sorted(kwargs.items())), *_stamps(kwargs.get("data_files")))
        if key not in _BENCHMARK_TASKS:  # once per process: N sub-envs share the rows
            _BENCHMARK_TASKS[key] = benchmark_task(task, **(dataset_kwargs or {}))
        return _BENCHMARK_TASKS[key]
    if dataset_kwargs:
        raise ValueError(
            f"dataset_kwargs={dataset_kwargs!r} configure a dataset= or a benchmark task "
            f"({sorted(BENCHMARKS)}), not the built-in task {task!r}: drop them."
        )
    return builtin_task(task or "summarize")


_BENCHMARK_TASKS: dict[tuple, Task] = {}


def _stamps(data_files: object) -> list[tuple]:
    """:func:`~textenvs.tasks.loaders.file_stamp` of every path in a ``data_files`` value."""
    if isinstance(data_files, (str, os.PathLike)):
        return [file_stamp(None, data_files)]
    if isinstance(data_files, dict):
        return [s for files in data_files.values() for s in _stamps(files)]
    if isinstance(data_files, (list, tuple)):
        return [s for files in data_files for s in _stamps(files)]
    return []


__all__ = [
    "BENCHMARKS",
    "BUILTIN_TASKS",
    "DatasetUnavailableError",
    "SPLITS",
    "SPLIT_SIZES",
    "DatasetFormatError",
    "Sample",
    "Task",
    "benchmark_task",
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
