"""The benchmark datasets of RL-for-LM papers, loaded from the Hugging Face hub by ``datasets``.

Each :class:`Benchmark` says where a dataset lives on the hub, which of its columns are the source
and the references, how its splits become ours, and the prompt the LM continues. The tasks are
the ones RL4LMs' GRUE benchmark (Ramamurthy et al. 2023) and TRL's examples train on:

==================  ==========================  ===============================================
task                hub dataset                 sample
==================  ==========================  ===============================================
``cnn_dailymail``   ``abisee/cnn_dailymail``    ``article`` -> ``highlights`` (config 3.0.0)
``xsum``            ``EdinburghNLP/xsum``       ``document`` -> ``summary``
``wmt16``           ``wmt/wmt16``               ``translation[src]`` -> ``translation[tgt]``
``imdb``            ``stanfordnlp/imdb``        the first half of ``text``'s words -> ``text``
``common_gen``      ``allenai/common_gen``      ``concepts`` -> every ``target`` of the set
==================  ==========================  ===============================================

Loading needs the ``hub`` extra (``pip install 'textenvs[hub]'``) and either network or the
dataset in the ``datasets`` cache. Offline, point a task at local files in the hub dataset's own
schema (the same columns and nesting) with ``dataset_kwargs={"data_files": {"train": ...,
"validation": ..., "test": ...}}``, keyed by the hub's split names: they go through the same
``datasets.load_dataset`` call and the same row conversion. Datasets are read as data only: no
dataset script or other remote code is ever run (``datasets`` 4 dropped scripts; a dataset that
needs one fails to load with a message).

Rows stay in ``datasets``' memory-mapped Arrow table: a split is a :class:`HubSamples` sequence
that turns a row into a :class:`~textenvs.tasks.Sample` when an episode draws it, so the 287k
articles of CNN/DM's train split cost the env their row numbers, not their text.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from textenvs.tasks.base import SPLITS, Sample, Task

# The languages of WMT16's pairs (every config is "xx-en"), for prompts.
WMT16_LANGUAGES = {
    "cs": "Czech",
    "de": "German",
    "en": "English",
    "fi": "Finnish",
    "ro": "Romanian",
    "ru": "Russian",
    "tr": "Turkish",
}
# A file's extension -> the `datasets` builder that reads it.
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DatasetUnavailableError(OSError):
    """A hub dataset that is neither in the ``datasets`` cache nor reachable (or needs code)."""


@dataclass(frozen=True)
class Benchmark:
    """How one hub dataset becomes a :class:`~textenvs.tasks.Task`.

    Attributes:
        name: The task name (``task="cnn_dailymail"``).
        path: The hub dataset (``load_dataset``'s ``path``).
        config: Its configuration name, if it has several.
        columns: The columns a row must have (checked at load, named in errors).
        splits: Ours -> ``(hub split, start, end)``: the rows ``[start, end)`` (fractions) of a
            seeded permutation (seed 0) of the hub split's samples; ``(split, 0, 1)`` is the
            whole split in the hub's order.
        prompt_template: The prompt around ``{source}``; where it comes from is in the docstring.
        default_reward: The metric the envs use when the user names none.
        reward_kwargs: The default ``reward_kwargs`` of that metric.
        row_sample: ``(row, options) -> Sample | str``: a row as a sample, or why it cannot be
            one (a missing or empty source or reference, a value of the wrong type): such rows
            are left out, with a warning that gives the first reason, and a split left with
            none raises it.
        group_by: A column whose equal values make one sample with several references
            (CommonGen's concept sets); ``row_sample`` then gets the group's rows.
        long_sources: Sources run past a small model's context: ``too_long="truncate"`` is the
            registered id's default.
        options: The task's own options and their defaults (``pair`` for WMT16).
        cut_side: Which end of a source ``too_long="truncate"`` drops (a
            :class:`~textenvs.tasks.Task` field).
        configure: ``(benchmark, options) -> (config, prompt_template)``: checks the task's
            options (adding derived ones) and gives the hub config to load and the default
            prompt (default: the benchmark's own).
        revision: The hub revision to load unless ``dataset_kwargs`` names one (a dataset whose
            main branch holds only a loading script is read from its parquet conversion).
    """

    name: str
    path: str
    config: str | None
    columns: tuple[str, ...]
    splits: Mapping[str, tuple[str, float, float]]
    prompt_template: str
    default_reward: str
    row_sample: Callable[..., Sample | None]
    reward_kwargs: Mapping[str, object] = field(default_factory=dict)
    group_by: str | None = None
    long_sources: bool = False
    options: Mapping[str, object] = field(default_factory=dict)
    cut_side: str = "end"
    configure: Callable[[Benchmark, dict], tuple[str | None, str]] = lambda benchmark, options: (
        benchmark.config,
        benchmark.prompt_template,
    )
    revision: str | None = None


def _why_not_text(value: object, column: str) -> str | None:
    """Why ``value`` is not a usable text of ``column`` (None: it is one)."""
    if isinstance(value, str):
        return None if value.strip() else f"{column!r} is empty"
    if value is None:
        return f"{column!r} is missing (null)"
    return f"{column!r} is {type(value).__name__} {str(value)[:40]!r}, not text"


def _pair_sample(source_key: str, reference_key: str):
    def row_sample(row: dict, options: dict) -> Sample | str:
        source, reference = row.get(source_key), row.get(reference_key)
        why = _why_not_text(source, source_key) or _why_not_text(reference, reference_key)
        return why or Sample(source, (reference,))

    return row_sample


def _wmt_sample(row: dict, options: dict) -> Sample | str:
    source_lang, target_lang = options["source_lang"], options["target_lang"]
    pair = row.get("translation")
    if not isinstance(pair, dict):
        return (
            f"'translation' is a {type(pair).__name__}, not an object of texts by language "
            "({'de': ..., 'en': ...}, the hub's schema)"
        )
    for lang in (source_lang, target_lang):
        if lang not in pair:
            return (
                f"'translation' has the languages {sorted(pair)}, not {lang!r} (the pair "
                f"{source_lang}-{target_lang}): pass dataset_kwargs={{'pair': ...}} that the "
                "files hold"
            )
    source, reference = pair[source_lang], pair[target_lang]
    why = _why_not_text(source, f"translation.{source_lang}")
    return (
        why
        or _why_not_text(reference, f"translation.{target_lang}")
        or Sample(source, (reference,))
    )


def _imdb_sample(row: dict, options: dict) -> Sample | str:
    # RL4LMs' IMDB text continuation: the first half of the review's words is the prompt and the
    # whole review the reference (rl4lms/data_pools/custom_text_generation_pools.py, IMDB).
    text = row.get("text")
    why = _why_not_text(text, "text")
    if why:
        return why
    words = text.split(" ")
    prefix = " ".join(words[: int(len(words) * options["prompt_fraction"])])
    return Sample(prefix, (text,)) if prefix.strip() else "'text' is too short to cut a prompt"


def _common_gen_sample(rows: list[dict], options: dict) -> Sample | str:
    concepts = rows[0].get("concepts")
    if not (isinstance(concepts, list) and concepts and all(_text(c) for c in concepts)):
        return (
            f"'concepts' is {str(concepts)[:40]!r}, not a non-empty list of words (the hub's "
            'schema: ["dog", "frisbee", ...])'
        )
    references = tuple(t for t in (r.get("target") for r in rows) if _text(t))
    if not references:
        return "no row of the concept set has a non-empty 'target'"
    return Sample(", ".join(concepts), references)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _configure_wmt16(benchmark: Benchmark, options: dict) -> tuple[str | None, str]:
    """The pair's config ("de-en" for both directions) and the prompt naming its languages."""
    options.update(wmt16_options(options["pair"]))
    template = benchmark.prompt_template.format(
        source_name=WMT16_LANGUAGES[options["source_lang"]],
        target_name=WMT16_LANGUAGES[options["target_lang"]],
    )
    return options["config"], template


def _configure_imdb(benchmark: Benchmark, options: dict) -> tuple[str | None, str]:
    fraction = options["prompt_fraction"]
    if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise ValueError(f"prompt_fraction must be a number in (0, 1), got {fraction!r}.")
    size = options["test_samples"]
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        raise ValueError(
            f"test_samples must be None (the whole test split) or an int >= 1 (RL4LMs' setting: "
            f"5000), got {size!r}."
        )
    return benchmark.config, benchmark.prompt_template


BENCHMARKS: dict[str, Benchmark] = {
    # GPT-2's zero-shot summarization prompt (Radford et al. 2019, section 3.6), which RL4LMs'
    # XSum pool also appends ("TL;DR:").
    "cnn_dailymail": Benchmark(
        name="cnn_dailymail",
        path="abisee/cnn_dailymail",
        config="3.0.0",
        columns=("article", "highlights"),
        splits={s: (s, 0.0, 1.0) for s in SPLITS},
        prompt_template="{source}\nTL;DR:",
        default_reward="rougeL",
        row_sample=_pair_sample("article", "highlights"),
        long_sources=True,
    ),
    "xsum": Benchmark(
        name="xsum",
        path="EdinburghNLP/xsum",
        config=None,
        columns=("document", "summary"),
        splits={s: (s, 0.0, 1.0) for s in SPLITS},
        prompt_template="{source}\nTL;DR:",
        default_reward="rougeL",
        row_sample=_pair_sample("document", "summary"),
        long_sources=True,
    ),
    # T5's translation prefix (Raffel et al. 2020), which RL4LMs' WMT configs use, with the target
    # language named again at the end so that a causal LM continues in it.
    "wmt16": Benchmark(
        name="wmt16",
        path="wmt/wmt16",
        config=None,  # the pair's config ("de-en", "ro-en", ...): see wmt16_options
        columns=("translation",),
        splits={s: (s, 0.0, 1.0) for s in SPLITS},
        prompt_template="translate {source_name} to {target_name}: {{source}}\n{target_name}:",
        default_reward="bleu",
        row_sample=_wmt_sample,
        options={"pair": "de-en"},
        configure=_configure_wmt16,
    ),
    # RL4LMs' IMDB split: train / validation = 80% / 20% of the hub's shuffled train split (it is
    # sorted by label), test = the hub's test split. The reward is a sentiment classifier's
    # probability of the positive label (reward="classifier").
    "imdb": Benchmark(
        name="imdb",
        path="stanfordnlp/imdb",
        config="plain_text",
        columns=("text", "label"),
        splits={
            "train": ("train", 0.0, 0.8),
            "validation": ("train", 0.8, 1.0),
            "test": ("test", 0.0, 1.0),
        },
        prompt_template="{source}",
        default_reward="classifier",
        reward_kwargs={"label": "POSITIVE"},
        row_sample=_imdb_sample,
        long_sources=True,
        options={"prompt_fraction": 0.5, "test_samples": None},
        cut_side="start",  # the LM continues the review: keep its last words
        configure=_configure_imdb,
    ),
    # The hub's CommonGen test split has no references (they are hidden for the leaderboard), so
    # its validation split is our test split and 5% of the train concept sets our validation.
    "common_gen": Benchmark(
        name="common_gen",
        path="allenai/common_gen",
        config=None,
        columns=("concept_set_idx", "concepts", "target"),
        splits={
            "train": ("train", 0.0, 0.95),
            "validation": ("train", 0.95, 1.0),
            "test": ("validation", 0.0, 1.0),
        },
        prompt_template="Write one sentence that uses all of these words: {source}\nSentence:",
        default_reward="bleu",
        row_sample=_common_gen_sample,
        group_by="concept_set_idx",
    ),
}


def _daily_dialog_sample(row: dict, options: dict):
    """A DailyDialog row as a :class:`~textenvs.tasks.dialogue.Dialogue`: its utterances
    alternate between two speakers, the first a ``"user"``, the second (the agent) the
    ``"assistant"``."""
    from textenvs.tasks.dialogue import Dialogue

    dialog = row.get("dialog")
    if not (isinstance(dialog, list) and all(isinstance(u, str) for u in dialog)):
        return f"'dialog' is {str(dialog)[:40]!r}, not a list of utterances (the hub's schema)"
    utterances = [u.strip() for u in dialog]
    if len(utterances) < 2 or not all(utterances):
        return "'dialog' has fewer than two utterances, or an empty one"
    roles = ("user", "assistant")
    return Dialogue(tuple((roles[i % 2], u) for i, u in enumerate(utterances)))


# The conversation datasets: their samples are Dialogues, for the dialogue envs only
# (textenvs.tasks.dialogue.resolve_dialogue_task).
DIALOGUE_BENCHMARKS: dict[str, Benchmark] = {}
DIALOGUE_BENCHMARKS["daily_dialog"] = Benchmark(
    # li2017dailydialog/daily_dialog: `dialog` (utterances), `act` and `emotion` (a label per
    # utterance); its main branch holds a loading script, which datasets 4 refuses: the hub's
    # parquet conversion of it is read instead.
    name="daily_dialog",
    path="li2017dailydialog/daily_dialog",
    config=None,
    columns=("dialog", "act", "emotion"),
    splits={s: (s, 0.0, 1.0) for s in SPLITS},
    prompt_template="{source}",
    default_reward="rougeL",
    row_sample=_daily_dialog_sample,
    revision="refs/convert/parquet",
)


Groups = np.ndarray | list[np.ndarray]


class HubSamples(Sequence):
    """The samples of one split of a hub dataset, made from its rows when accessed.

    Loading keeps the row numbers of the usable samples (a source and a reference); the rows
    themselves stay in ``datasets``' memory-mapped table.
    """

    def __init__(
        self, rows, groups: Groups, benchmark: Benchmark, options: dict, where: str
    ) -> None:
        self.rows, self.benchmark, self.options, self.path = rows, benchmark, options, where
        # per sample its row numbers: an (n,) int64 array of one row each (8 bytes a sample),
        # or a list of arrays for grouped rows (CommonGen's concept sets)
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def _sample(self, rows) -> Sample | str:
        """The sample of these rows (a reason string for rows left out at load)."""
        records = [self.rows[int(r)] for r in np.atleast_1d(rows)]
        if self.benchmark.group_by is None:
            return self.benchmark.row_sample(records[0], self.options)
        return self.benchmark.row_sample(records, self.options)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._sample(self.groups[index])

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def row_of(self, index: int) -> int:
        """The hub row (the first, for a group) of sample ``index``."""
        return int(np.atleast_1d(self.groups[index])[0])


def wmt16_options(pair: object) -> dict:
    """``pair="de-en"`` (translate German to English) or ``"en-de"`` (the other direction): the
    config to load (WMT16's are all ``"xx-en"``) and the two languages."""
    if not (isinstance(pair, str) and pair.count("-") == 1):
        raise ValueError(_bad_pair(pair))
    source, target = pair.split("-")
    if (
        "en" not in (source, target)
        or source == target
        or not {source, target} <= set(WMT16_LANGUAGES)
    ):
        raise ValueError(_bad_pair(pair))
    other = target if source == "en" else source
    return {"config": f"{other}-en", "source_lang": source, "target_lang": target}


def _bad_pair(pair: object) -> str:
    pairs = [f"{x}-en" for x in WMT16_LANGUAGES if x != "en"]
    return (
        f"pair={pair!r} is not a WMT16 pair: use one of {pairs} (translate into English) or the "
        f"same reversed ('en-de', ...) to translate out of English."
    )


def benchmark_task(name: str, **kwargs) -> Task:
    """The :class:`~textenvs.tasks.Task` of benchmark ``name`` (a key of :data:`BENCHMARKS`).

    The keyword arguments are an env's ``dataset_kwargs``.

    Keyword Args:
        data_files: Local files in the hub dataset's schema instead of the hub: a path, a list of
            paths or a dict keyed by the hub's split names (``.jsonl`` / ``.json`` / ``.csv`` /
            ``.parquet``), read by the same ``datasets.load_dataset`` call.
        pair: WMT16 only: the language pair and direction (``"de-en"``, ``"en-ro"``, ...).
        prompt_fraction: IMDB only: the share of the review's words that is the prompt (0.5).
        test_samples: IMDB only: the test split as ``test_samples`` reviews of a seeded shuffle
            (seed 0) of the hub's test split, at most all of it; None (default): all 25,000.
            RL4LMs' setting is 5,000 (its pool shuffles the test split without a seed, keeps
            5,000 and reads the first 2,000 of them, so its exact reviews cannot be rebuilt).
        prompt_template: Another prompt around ``{source}``.
        revision, cache_dir: Passed to ``datasets.load_dataset``.
    """
    benchmark = BENCHMARKS[name] if name in BENCHMARKS else DIALOGUE_BENCHMARKS[name]
    kwargs = dict(kwargs)
    data_files = kwargs.pop("data_files", None)
    template = kwargs.pop("prompt_template", None)
    load_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir") if k in kwargs}
    for key, value in load_kwargs.items():
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(
                f"dataset_kwargs[{key!r}] must be a string{' or path' * (key == 'cache_dir')}, "
                f"got {type(value).__name__} {value!r}."
            )
    if template is not None and not (isinstance(template, str) and "{source}" in template):
        raise ValueError(
            f"dataset_kwargs['prompt_template'] must be a string holding '{{source}}', got "
            f"{template!r}."
        )
    if isinstance(data_files, Mapping):
        read = {hub for hub, _, _ in benchmark.splits.values()}
        unread = sorted(set(map(str, data_files)) - read)
        if unread:
            warnings.warn(
                f"dataset_kwargs['data_files'] has the splits {unread}, which task {name!r} "
                f"does not read (it reads the hub splits {sorted(read)}): those files are "
                "ignored. Check the split names for a typo.",
                UserWarning,
                stacklevel=4,
            )
    options = {key: kwargs.pop(key, default) for key, default in benchmark.options.items()}
    if kwargs:
        allowed = ["data_files", "prompt_template", "revision", "cache_dir", *benchmark.options]
        raise ValueError(
            f"Unknown dataset_kwargs {sorted(kwargs)} for task {name!r}: it takes {allowed}."
        )
    config, default_template = benchmark.configure(benchmark, options)
    template = template or default_template
    hub_splits = {}
    splits = {}
    for ours, (hub_split, start, end) in benchmark.splits.items():
        if hub_split not in hub_splits:
            hub_splits[hub_split] = _load_split(
                benchmark, config, hub_split, data_files, load_kwargs, options
            )
        rows, groups, where = hub_splits[hub_split]
        if (start, end) != (0.0, 1.0):  # a seeded share of the split, disjoint from the rest
            n = len(groups)
            part_groups = _seeded_part(groups, round(start * n), round(end * n))
            where_part = f"{where} [{start:.0%}, {end:.0%}) of a seeded shuffle"
        else:
            part_groups, where_part = groups, where
        size = options.get("test_samples") if ours == "test" else None
        if size is not None and size < len(part_groups):  # RL4LMs' shuffled test reviews
            part_groups = _seeded_part(part_groups, 0, size)
            where_part = f"{where_part}, {size} of a seeded shuffle"
        splits[ours] = HubSamples(rows, part_groups, benchmark, options, where_part)
    return Task(
        name,
        splits,
        template,
        benchmark.default_reward,
        reward_kwargs=dict(benchmark.reward_kwargs),
        cut_side=benchmark.cut_side,
    )


def _seeded_part(groups, first: int, stop: int):
    """The groups at positions ``[first, stop)`` of a seeded permutation (seed 0), in their own
    order; ``groups`` an array or a list, the part of the same kind."""
    chosen = np.sort(np.random.default_rng(0).permutation(len(groups))[first:stop])
    return groups[chosen] if isinstance(groups, np.ndarray) else [groups[i] for i in chosen]


def _load_split(
    benchmark: Benchmark,
    config: str | None,
    split: str,
    data_files: object,
    load_kwargs: dict,
    options: dict,
) -> tuple[object, list[np.ndarray], str]:
    """One hub split: its rows, the row numbers of each usable sample, and its name for errors."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"Task {benchmark.name!r} loads {benchmark.path!r} with the 'datasets' package: "
            "pip install 'textenvs[hub]'."
        ) from e
    if data_files is None:
        where = f"{benchmark.path}" + (f" ({config})" if config else "") + f" [{split}]"
        path, name, files = benchmark.path, config, None
        if benchmark.revision is not None:
            load_kwargs = {"revision": benchmark.revision, **load_kwargs}
    else:
        files = _split_files(benchmark, data_files, split)
        where = f"{files} [{split}]"
        path, name = _builder(files), None
        check_data_files(files)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one "Generating split" bar per split and env is noise
    try:
        rows = datasets.load_dataset(
            path,
            name,
            split=split,
            data_files=None if files is None else {split: files},
            **load_kwargs,
        )
    except (
        OSError,
        ConnectionError,
        ValueError,
        StopIteration,  # a JSON file with no row (blank lines) ends the reader's iterator
        datasets.exceptions.DatasetsError,
    ) as e:
        raise DatasetUnavailableError(_unavailable(benchmark, config, split, data_files, e)) from e
    finally:
        if bars:
            datasets.enable_progress_bars()
    missing = [c for c in benchmark.columns if c not in rows.column_names]
    if missing:
        raise ValueError(
            f"{where} has columns {rows.column_names}, not {list(benchmark.columns)}: task "
            f"{benchmark.name!r} reads {benchmark.path}'s schema (missing {missing}); write the "
            "local files with the hub dataset's own column names and nesting."
        )
    return rows, _usable_groups(rows, benchmark, options, where), where


def _split_files(benchmark: Benchmark, data_files: object, split: str):
    if isinstance(data_files, (str, os.PathLike)):
        return os.fspath(data_files)
    if isinstance(data_files, (list, tuple)) and all(
        isinstance(f, (str, os.PathLike)) for f in data_files
    ):
        return [os.fspath(f) for f in data_files]
    if isinstance(data_files, Mapping):
        if split not in data_files:
            needed = sorted({hub for hub, _, _ in benchmark.splits.values()})
            raise ValueError(
                f"dataset_kwargs['data_files'] has splits {sorted(data_files)}, but task "
                f"{benchmark.name!r} reads the hub splits {needed} (keyed by the hub's names): "
                f"add {split!r}."
            )
        return _split_files(benchmark, data_files[split], split)
    raise ValueError(
        f"dataset_kwargs['data_files'] must be a path, a list of paths or a dict of them keyed by "
        f"the hub's split names, got {data_files!r}."
    )


def _builder(files) -> str:
    first = files if isinstance(files, str) else files[0]
    extension = os.path.splitext(first)[1].lower()
    if extension not in _BUILDERS:
        raise ValueError(
            f"Cannot read {first!r}: local data files must be {sorted(_BUILDERS)} in the hub "
            "dataset's schema."
        )
    return _BUILDERS[extension]


def _unavailable(benchmark, config, split, data_files, error: Exception) -> str:
    if data_files is not None:
        cause = _cause(error)
        return (
            f"Could not read the local files of task {benchmark.name!r} (split {split!r}): "
            f"{cause}. Check the paths in dataset_kwargs['data_files']."
        )
    hub_splits = sorted({hub for hub, _, _ in benchmark.splits.values()})
    files = ", ".join(f"{s!r}: ..." for s in hub_splits)
    return unavailable_message(
        benchmark.path,
        config,
        split,
        error,
        "point the task at local files in the hub's schema (columns "
        f"{list(benchmark.columns)}), one per hub split it reads: "
        f"dataset_kwargs={{'data_files': {{{files}}}}}",
    )


def _cause(error: BaseException) -> str:
    """An error's message and its cause's (``datasets`` wraps the reader's real error)."""
    text = " ".join(str(error).split()) or type(error).__name__
    inner = error.__cause__ or error.__context__
    if inner is not None and str(inner) and str(inner) not in text:
        text += f" ({type(inner).__name__}: {' '.join(str(inner).split())})"
    return text[:400]


def check_data_files(files) -> None:
    """Local data files exist, are files and hold rows (a 0-byte file or a parquet of 0 rows
    would fail deep inside ``datasets`` with no word of which file); glob patterns are left to
    ``datasets``."""
    for path in [files] if isinstance(files, str) else files:
        if any(c in path for c in "*?[") or "://" in path:
            continue
        if not os.path.exists(path):
            raise FileNotFoundError(f"Data file {path!r} does not exist: check the path.")
        if not os.path.isfile(path):
            raise ValueError(f"Data file {path!r} is not a file.")
        if os.path.getsize(path) == 0:
            raise ValueError(f"Data file {path!r} is empty (0 bytes): it holds no rows.")
        if path.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                rows = pq.read_metadata(path).num_rows
            except Exception as e:  # ArrowInvalid and kin: not a parquet file
                raise ValueError(f"Data file {path!r} is not a readable parquet file ({e}).") from e
            if rows == 0:
                raise ValueError(f"Data file {path!r} holds 0 rows.")


def unavailable_message(
    path: str, config: str | None, split: str, error: Exception, local: str
) -> str:
    """What to do about a hub dataset that could not be loaded (``local``: how to read local
    files instead)."""
    cause = _cause(error)
    load = f"datasets.load_dataset({path!r}" + (f", {config!r}" if config else "") + ")"
    return (
        f"Dataset {path!r}"
        + (f" (config {config!r})" if config else "")
        + f", split {split!r}, could not be loaded: {cause}. It is not in the datasets cache "
        "($HF_DATASETS_CACHE, default ~/.cache/huggingface/datasets) and the hub cannot be "
        "reached (or HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set), or it needs a loading script "
        "(never run). Either cache it once with network "
        f"(python -c \"import datasets; {load}\"; needs pip install 'textenvs[hub]'), or {local}."
    )


def _usable_groups(rows, benchmark: Benchmark, options: dict, where: str) -> Groups:
    """Per sample, its row numbers; rows without a usable source or reference are left out."""
    left_out: list[tuple[int, str]] = []  # (row, why) of the rows that make no sample
    if benchmark.group_by is None:  # one pass over the table in batches of rows
        kept, index = [], 0
        for batch in rows.iter(batch_size=1024):
            for record in (dict(zip(batch, values)) for values in zip(*batch.values())):
                sample = benchmark.row_sample(record, options)
                if not isinstance(sample, str):  # a Sample (or a Dialogue), not a reason
                    kept.append(index)
                else:
                    left_out.append((index, sample))
                index += 1
        usable = np.asarray(kept, dtype=np.int64)
        total = index
    else:
        keys = np.asarray(rows[benchmark.group_by])
        order = np.argsort(keys, kind="stable")
        _, starts = np.unique(keys[order], return_index=True)
        samples = HubSamples(rows, np.split(order, starts[1:]), benchmark, options, where)
        usable = []
        for group, sample in zip(samples.groups, samples):
            if not isinstance(sample, str):
                usable.append(group)
            else:
                left_out.append((int(group[0]), sample))
        total = len(samples.groups)
    if left_out:
        row, why = left_out[0]
        what = f"{len(left_out)} of {total} {'concept sets' if benchmark.group_by else 'rows'}"
        if not len(usable):
            raise ValueError(
                f"{where} holds no usable sample: {what} make none (row {row}: {why})."
            )
        warnings.warn(
            f"{where}: {what} make no sample and are left out (row {row}: {why}).",
            UserWarning,
            stacklevel=6,
        )
    return usable
