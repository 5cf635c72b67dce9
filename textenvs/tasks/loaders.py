"""Loaders for real data: JSON Lines and CSV files, Hugging Face ``datasets``, lists of samples.

Every malformed record raises :class:`DatasetFormatError` naming the file (or dataset) and the line
(or row). A file is loaded once per process (:func:`load_dataset` keeps it by path, size and
modification time), so N sub-envs share one copy; a JSON Lines file is not even held in memory:
:class:`JsonlSamples` keeps one file offset per sample and reads a sample when it is drawn.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from textenvs.tasks.base import SPLITS, Sample, Task


class DatasetFormatError(ValueError):
    """A data file line that cannot become a :class:`Sample`; the message names file and line."""


MAX_SAMPLE_BYTES = 2**21
"""A line (JSONL) or row (CSV) of a data file at most (2 MiB, about 500k tokens: far past any
context); a longer one is refused with its line number, rather than tokenized for minutes."""
MAX_JSON_DEPTH = 64
"""Nesting of a JSON line at most (a sample is an object of strings and lists of strings)."""


def _too_long(where: str, size: int) -> DatasetFormatError:
    return DatasetFormatError(
        f"{where}: {size:,} bytes, more than the {MAX_SAMPLE_BYTES:,} a sample may hold (about "
        "500k tokens, past any model's context); cut the text, or split the file's samples."
    )


def _json_depth_ok(raw: bytes) -> bool:
    """Whether a JSON text nests no deeper than :data:`MAX_JSON_DEPTH` (brackets counted outside
    strings), checked before ``json.loads`` recurses into it."""
    depth, in_string, escaped = 0, False, False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


def _as_references(value: object, where: str, reference_key: str) -> tuple[str, ...]:
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, (list, tuple)) or not refs:
        raise DatasetFormatError(
            f"{where}: field {reference_key!r} must be a string or a non-empty list of strings."
        )
    if not all(isinstance(r, str) and r.strip() for r in refs):
        raise DatasetFormatError(
            f"{where}: field {reference_key!r} holds an empty or non-string reference."
        )
    return tuple(refs)


def _make_sample(record: dict, where: str, source_key: str, reference_key: str) -> Sample:
    source = record.get(source_key)
    if not isinstance(source, str) or not source.strip():
        raise DatasetFormatError(
            f"{where}: field {source_key!r} is missing or empty; every sample needs a source."
        )
    if reference_key not in record:
        raise DatasetFormatError(
            f"{where}: field {reference_key!r} is missing; every sample needs a reference."
        )
    return Sample(source, _as_references(record[reference_key], where, reference_key))


def _jsonl_sample(raw: bytes, where: str, source_key: str, reference_key: str) -> Sample:
    if len(raw) > MAX_SAMPLE_BYTES:
        raise _too_long(where, len(raw))
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and not _json_depth_ok(raw):
        raise DatasetFormatError(
            f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels; a sample is one object "
            "of strings and lists of strings."
        )
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DatasetFormatError(
            f"{where}: not UTF-8 (byte {e.start} of the line): save the file as UTF-8."
        ) from e
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{where}: not valid JSON ({e.msg}).") from e
    if not isinstance(record, dict):
        raise DatasetFormatError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    return _make_sample(record, where, source_key, reference_key)


class JsonlSamples(Sequence):
    """The samples of a JSON Lines file, read from the file when accessed.

    Loading checks every line once (file and line named on error) and keeps only each sample's
    byte offset, so a large file costs a few bytes per sample in memory, however many envs
    share it. A sample is read back (one seek, one line) when an episode draws it.
    """

    def __init__(
        self, path: str | os.PathLike, source_key: str = "source", reference_key: str = "references"
    ) -> None:
        self.path, self.source_key, self.reference_key = os.fspath(path), source_key, reference_key
        offsets, lines, position = [], [], 0
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    _jsonl_sample(raw, self._where(lineno), source_key, reference_key)
                    offsets.append(position)
                    lines.append(lineno)
                position += len(raw)
        if not offsets:
            empty = "is empty (0 bytes)" if position == 0 else "holds only blank lines"
            raise DatasetFormatError(
                f"{self.path}: {empty}; a JSON Lines dataset needs one sample object a line."
            )
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.lines = np.asarray(lines, dtype=np.int64)

    def _where(self, lineno: int) -> str:
        return f"{self.path}, line {lineno}"

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[index]))
            raw = f.readline()
        return _jsonl_sample(
            raw, self._where(int(self.lines[index])), self.source_key, self.reference_key
        )

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def line_of(self, index: int) -> int:
        """The file line of sample ``index``."""
        return int(self.lines[index])


class SampleSubset(Sequence):
    """A view of some samples of a larger sequence (a split of a file, the samples that fit a
    model), in the order of ``indices``; file lines stay known where the base knows them."""

    def __init__(self, base: Sequence[Sample], indices: Sequence[int]) -> None:
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.path = getattr(base, "path", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.base[int(i)] for i in self.indices[index]]
        return self.base[int(self.indices[index])]

    def __iter__(self) -> Iterator[Sample]:
        return (self.base[int(i)] for i in self.indices)

    def line_of(self, index: int) -> int | None:
        """The file line of sample ``index`` (None when the base is not a file)."""
        line_of = getattr(self.base, "line_of", None)
        return line_of(int(self.indices[index])) if line_of else None


def split_samples(
    samples: Sequence[Sample], fractions: Sequence[float], seed: int
) -> dict[str, SampleSubset]:
    """A seeded, disjoint split of ``samples`` into train / validation / test by ``fractions``.

    The same file and seed always give the same split; each split keeps file order.
    """
    if not (
        isinstance(fractions, (list, tuple))
        and len(fractions) == len(SPLITS)
        and all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in fractions)
        and abs(sum(fractions) - 1) < 1e-9
    ):
        raise ValueError(
            f"split_fractions must be three numbers in [0, 1] for {list(SPLITS)} that sum to 1, "
            f"got {fractions!r}."
        )
    order = np.random.default_rng(seed).permutation(len(samples))
    ends = np.round(np.cumsum(fractions) * len(samples)).astype(int)
    parts = np.split(order, ends[:-1])
    out = {}
    for name, part in zip(SPLITS, parts):
        if not len(part):
            raise ValueError(
                f"split_fractions={tuple(fractions)} leaves split {name!r} empty for "
                f"{len(samples)} samples: give it a larger fraction, or use more samples."
            )
        out[name] = SampleSubset(samples, np.sort(part))
    return out


def load_jsonl(
    path: str | os.PathLike, source_key: str = "source", reference_key: str = "references"
) -> JsonlSamples:
    """Samples from a JSON Lines file: one object a line, ``{"source": ..., "references": [...]}``.

    ``references`` may be one string or a list of strings. Blank lines are skipped. The result is
    a sequence of :class:`Sample` read from the file on access (:class:`JsonlSamples`).

    Raises:
        DatasetFormatError: naming the file, the line number and what is wrong.
    """
    return JsonlSamples(path, source_key, reference_key)


def load_csv(
    path: str | os.PathLike, source_key: str = "source", reference_key: str = "reference"
) -> list[Sample]:
    """Samples from a CSV file with a header row.

    The source column is ``source_key``; every column whose name starts with ``reference_key``
    (``reference``, ``reference2``, ``references_1``, ...) holds one reference; empty cells are
    ignored.

    Raises:
        DatasetFormatError: naming the file, the line number and what is wrong.
    """
    try:
        return _read_csv(path, source_key, reference_key)
    except UnicodeDecodeError as e:
        raise DatasetFormatError(
            f"{os.fspath(path)}, line {_first_non_utf8_line(path)}: not UTF-8: save the file as "
            "UTF-8."
        ) from e


def _first_non_utf8_line(path: str | os.PathLike) -> int | str:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return "?"


def _read_csv(path: str | os.PathLike, source_key: str, reference_key: str) -> list[Sample]:
    limit = csv.field_size_limit()
    csv.field_size_limit(MAX_SAMPLE_BYTES + 1)  # csv's own 128 KiB cap is below a long article
    try:
        return _read_csv_rows(path, source_key, reference_key)
    except csv.Error as e:
        raise DatasetFormatError(f"{os.fspath(path)}: not readable as CSV ({e}).") from e
    finally:
        csv.field_size_limit(limit)


def _read_csv_rows(path: str | os.PathLike, source_key: str, reference_key: str) -> list[Sample]:
    samples = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        ref_cols = [c for c in header if c.startswith(reference_key)]
        if source_key not in header or not ref_cols:
            raise DatasetFormatError(
                f"{os.fspath(path)}, line 1: header {header} needs a {source_key!r} column and at "
                f"least one column starting with {reference_key!r}."
            )
        for row in reader:
            where = f"{os.fspath(path)}, line {reader.line_num}"
            if None in row:
                raise DatasetFormatError(f"{where}: more cells than header columns.")
            size = sum(len(v) for v in row.values() if isinstance(v, str))
            if size > MAX_SAMPLE_BYTES:
                raise _too_long(where, size)
            refs = [row[c] for c in ref_cols if row[c] is not None and row[c].strip()]
            if not refs:
                raise DatasetFormatError(
                    f"{where}: no reference; fill at least one of the columns {ref_cols}."
                )
            samples.append(
                _make_sample(
                    {source_key: row[source_key], reference_key: refs},
                    where,
                    source_key,
                    reference_key,
                )
            )
    if not samples:
        raise DatasetFormatError(f"{os.fspath(path)}: holds no samples (only a header, or empty).")
    return samples


def load_hf_dataset(
    name: str,
    split: str = "train",
    source_key: str | None = None,
    reference_key: str | None = None,
    config: str | None = None,
    **load_kwargs,
) -> list[Sample]:
    """Samples from a Hugging Face ``datasets`` dataset (needs ``pip install textenvs[hub]``).

    Args:
        name: A dataset name or a ``datasets`` builder (``"json"``, ``"csv"``, ... with
        ``data_files=``).
        split: The split to read.
        source_key: The column holding the source text.
        reference_key: The column holding the reference (a string or a list of strings).
        config: The dataset's configuration name, if it has several.
        **load_kwargs: Passed to ``datasets.load_dataset`` (``data_files``, ``revision``, ...).
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "Loading a dataset by name needs the 'datasets' package: pip install 'textenvs[hub]'."
        ) from e
    from textenvs.tasks.hub import (
        DatasetUnavailableError,
        check_data_files,
        unavailable_message,
    )

    files = load_kwargs.get("data_files")
    for value in files.values() if isinstance(files, dict) else [files] if files else []:
        check_data_files([os.fspath(v) for v in value] if isinstance(value, list) else [value])
    try:
        ds = datasets.load_dataset(name, config, split=split, **load_kwargs)
    except (
        OSError,
        ConnectionError,
        ValueError,
        StopIteration,
        datasets.exceptions.DatasetsError,
    ) as e:
        local = (
            "read local files with dataset='hf:json' (or 'hf:csv', 'hf:parquet') and "
            "dataset_kwargs={'data_files': ..., 'source_key': ..., 'reference_key': ...}"
        )
        raise DatasetUnavailableError(unavailable_message(name, config, split, e, local)) from e
    for role, key in (("source_key", source_key), ("reference_key", reference_key)):
        if key not in ds.column_names:
            raise ValueError(
                f"Dataset {name!r} ({split}) has columns {ds.column_names}; {role}={key!r} is not "
                "one of them: pass "
                "dataset_kwargs={'source_key': ..., 'reference_key': ...} naming its source and "
                "reference columns."
            )
    return [
        _make_sample(dict(r), f"{name}[{split}], row {i}", source_key, reference_key)
        for i, r in enumerate(ds)
    ]


def task_from_samples(
    name: str,
    samples: Sequence[Sample] | dict[str, Sequence[Sample]],
    prompt_template: str = "{source}\n",
    default_reward: str = "rougeL",
) -> Task:
    """Wrap user samples as a Task; a plain list becomes every split (train = validation = test).

    A :class:`JsonlSamples` stays as it is (read on access); other sequences become tuples.
    """
    if isinstance(samples, dict):
        splits = {k: _checked_samples(k, v) for k, v in samples.items()}
    else:
        shared = _checked_samples("every split", samples)
        splits = {s: shared for s in SPLITS}
    return Task(name, splits, prompt_template, default_reward)


def _checked_samples(split: str, samples: Sequence[Sample]) -> Sequence[Sample]:
    if isinstance(samples, (JsonlSamples, SampleSubset)):
        return samples  # every line was checked when the file was loaded
    samples = tuple(samples)
    for s in samples:
        if not isinstance(s, Sample):
            raise TypeError(
                f"Split {split!r} holds a {type(s).__name__}; build samples with textenvs.Sample."
            )
    return samples


_LOADED: dict[tuple, Task] = {}


def load_dataset(dataset: str | os.PathLike | Sequence[Sample] | Task | dict, **kwargs) -> Task:
    """A Task from what a user passes as ``dataset=``.

    Accepts a :class:`Task`, a list of :class:`Sample`, a ``.jsonl`` / ``.csv`` path,
    ``"hf:NAME"`` for a Hugging Face dataset (``hf_split``, ``source_key``, ``reference_key``
    keyword arguments), or a dict with one of those per split (``{"train": "a.jsonl",
    "validation": ..., "test": ...}``: separate files). Extra keyword arguments
    ``prompt_template`` and ``default_reward`` apply.

    Splits of one file: by default every split is the whole file (train = validation = test, with
    a warning); ``split_fractions=(0.8, 0.1, 0.1)`` makes a seeded disjoint split instead
    (``split_seed``, default 0). A file (or hub dataset) is loaded once per process for the same
    arguments and the same file contents (path, size, modification time): every env that names it
    shares that Task.
    """
    if isinstance(dataset, Task):
        return dataset
    sources = dataset if isinstance(dataset, dict) else {None: dataset}
    if not all(isinstance(v, (str, os.PathLike)) for v in sources.values()):
        return _load_dataset(dataset, **kwargs)  # in-memory samples: nothing to cache by file
    key = (
        *(file_stamp(k, v) for k, v in sorted(sources.items(), key=str)),
        repr(sorted(kwargs.items())),
    )
    if key not in _LOADED:
        _LOADED[key] = _load_dataset(dataset, **kwargs)
    return _LOADED[key]


def file_stamp(split: str | None, source: str | os.PathLike) -> tuple:
    """What identifies a file's contents for the per-process cache: its real path, size and
    modification time (the path alone when it does not exist)."""
    path = os.fspath(source)
    if not os.path.exists(path):
        return (split, path)
    stat = os.stat(path)
    return (split, os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


def _load_dataset(dataset: Sequence[Sample] | str | os.PathLike | dict, **kwargs) -> Task:
    template = kwargs.pop("prompt_template", "{source}\n")
    reward = kwargs.pop("default_reward", "rougeL")
    fractions = kwargs.pop("split_fractions", None)
    seed = kwargs.pop("split_seed", 0)
    if isinstance(dataset, dict):  # separate files (or sample lists) per split
        if set(dataset) != set(SPLITS):
            raise ValueError(
                f"A dataset dict needs exactly the splits {list(SPLITS)}, got {sorted(dataset)}."
            )
        if fractions is not None:
            raise ValueError("split_fractions splits one file: give one path, not a dict.")
        splits = {name: _load_samples(dataset[name], kwargs)[1] for name in SPLITS}
        return task_from_samples(f"dataset {dataset['train']}", splits, template, reward)
    name, samples = _load_samples(dataset, kwargs)
    if fractions is not None:
        return task_from_samples(name, split_samples(samples, fractions, seed), template, reward)
    if name != "custom":
        warnings.warn(
            f"Dataset {name} serves the same {len(samples)} samples as train, validation and "
            "test: pass dataset_kwargs={'split_fractions': (0.8, 0.1, 0.1)} for a seeded "
            "held-out split, or dataset={'train': ..., 'validation': ..., 'test': ...} for "
            "separate files.",
            UserWarning,
            stacklevel=5,
        )
    return task_from_samples(name, samples, template, reward)


def _load_samples(dataset: Sequence[Sample] | str | os.PathLike, kwargs: dict) -> tuple:
    """``(name, samples)`` of one file, hub dataset or list."""
    if isinstance(dataset, (list, tuple)):
        return "custom", _checked_samples("every split", dataset)
    path = os.fspath(dataset)
    if path.startswith("hf:"):
        hub_kwargs = dict(kwargs)
        split = hub_kwargs.pop("hf_split", "train")
        return path, load_hf_dataset(path[3:], split, **hub_kwargs)
    if path.endswith(".jsonl"):
        return path, load_jsonl(path, **kwargs)
    if path.endswith(".csv"):
        return path, load_csv(path, **kwargs)
    raise ValueError(_NOT_A_DATASET.format(path=path))


_NOT_A_DATASET = (
    "Cannot load dataset {path!r}: give a .jsonl or .csv file, 'hf:NAME' for a Hugging Face "
    "dataset, a list of textenvs.Sample, a textenvs.tasks.Task, or a dict of those per split."
)
