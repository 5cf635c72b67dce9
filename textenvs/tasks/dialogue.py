"""Conversations as samples: :class:`Dialogue`, :class:`DialogueTask`, the built-in multi-turn task
and the chat-messages JSON Lines format.

A dialogue is a recorded conversation, a list of messages ``{"role": ..., "content": ...}`` (the
format Hugging Face chat templates and OpenAI tools read and write), and the role the agent plays
in it (``agent_role``, default ``"assistant"``). The messages before the agent's first turn open
the episode; each recorded turn of the agent is the reference its turn is scored against; the
other messages are what the data responder (:class:`textenvs.responders.DataResponder`) says.

* ``briefing`` (built in): a user hands the agent a news article of the built-in ``summarize``
  domain and asks three or four questions about it, one a turn, in a seeded order (the headline,
  where, who, when, what); every answer is a deterministic function of the article, so a perfect
  policy scores 1.0 while the built-in LM, never trained on questions, scores far lower.
* a JSON Lines file of ``{"messages": [...]}`` objects (:func:`load_chat_jsonl`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from textenvs.tasks.base import SPLITS, Task
from textenvs.tasks.builtin import news_event
from textenvs.tasks.loaders import (
    MAX_JSON_DEPTH,
    MAX_SAMPLE_BYTES,
    DatasetFormatError,
    _json_depth_ok,
    split_samples,
)

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Dialogue:
    """One recorded conversation: its messages and the role the agent plays.

    Attributes:
        messages: ``(role, content)`` pairs in order. A role is any non-empty string (``"user"``,
            ``"assistant"``, ``"system"``, a speaker's name); the contents are non-empty strings.
        agent_role: The role the agent plays; at least one message must be its.
        first_turn: Which of the agent's messages it plays first (0: its first); its earlier
            messages are part of the opening (a window of a longer conversation).
    """

    messages: tuple[tuple[str, str], ...]
    agent_role: str = "assistant"
    first_turn: int = 0

    def __post_init__(self) -> None:
        pairs = []
        for i, message in enumerate(self.messages):
            if isinstance(message, dict):
                message = (message.get("role"), message.get("content"))
            role, content = message if len(message) == 2 else (None, None)
            if not (isinstance(role, str) and role.strip()):
                raise ValueError(f"Message {i} has no role: give each a non-empty 'role' string.")
            if not (isinstance(content, str) and content.strip()):
                raise ValueError(
                    f"Message {i} ({role}) has no content: give each a non-empty 'content' string."
                )
            pairs.append((role, content))
        object.__setattr__(self, "messages", tuple(pairs))
        if not isinstance(self.agent_role, str) or self.agent_role not in self.roles:
            raise ValueError(
                f"agent_role={self.agent_role!r} speaks no message of this dialogue (its roles: "
                f"{sorted(self.roles)}): pass the role the agent plays."
            )
        spoken = sum(role == self.agent_role for role, _ in self.messages)
        if not (isinstance(self.first_turn, int) and 0 <= self.first_turn < spoken):
            raise ValueError(
                f"first_turn={self.first_turn!r}: the agent ({self.agent_role}) has {spoken} "
                f"messages, so pass an int in [0, {spoken - 1}]."
            )

    @property
    def roles(self) -> set[str]:
        return {role for role, _ in self.messages}

    @functools.cached_property
    def agent_turns(self) -> tuple[int, ...]:
        """Indices of the agent's messages from ``first_turn`` on (its turns to play, whose
        contents are the references)."""
        spoken = [i for i, (role, _) in enumerate(self.messages) if role == self.agent_role]
        return tuple(spoken[self.first_turn :])

    @property
    def opening(self) -> tuple[tuple[str, str], ...]:
        """The messages before the agent's first turn: what an episode starts from."""
        return self.messages[: self.agent_turns[0]]

    @property
    def references(self) -> tuple[str, ...]:
        """The agent's recorded turns, in order."""
        return tuple(self.messages[i][1] for i in self.agent_turns)

    @property
    def source(self) -> str:
        """The opening as plain text (what ``info["prompt"]`` shows)."""
        return "\n".join(f"{role}: {content}" for role, content in self.opening)

    def replies_after(self, turn: int) -> tuple[tuple[str, str], ...] | None:
        """The recorded messages of the other party after the agent's turn ``turn`` and before its
        next one; None when the agent has no recorded turn after ``turn`` (the recording ends)."""
        if turn + 1 >= len(self.agent_turns):
            return None
        return self.messages[self.agent_turns[turn] + 1 : self.agent_turns[turn + 1]]


@dataclass(frozen=True, eq=False)
class DialogueTask(Task):
    """A named set of dialogues per split (a :class:`~textenvs.tasks.Task` whose samples are
    :class:`Dialogue`)."""

    prompt_template: str = "{source}"

    def prompt(self, sample: Dialogue) -> str:  # type: ignore[override]
        return sample.source


# ---------------------------------------------------------------------------------------------
# The built-in multi-turn task: questions about an article
# ---------------------------------------------------------------------------------------------

BRIEFING_SPLIT_SIZES = {"train": 1000, "validation": 100, "test": 100}
_BRIEFING_SEED = 20261207
BRIEFING_SYSTEM = "Answer the questions about the article in a few words."


def _briefing_dialogue(rng: np.random.Generator) -> Dialogue:
    event = news_event(rng, max_details=3)
    actor, obj = event.actor, event.obj
    questions = [
        ("Where did it happen?", f"In {event.town}."),
        ("Who was involved?", f"{actor[0].upper()}{actor[1:]}."),
        ("When did it happen?", f"On {event.day}."),
        ("What was it about?", f"{obj[0].upper()}{obj[1:]}."),
    ]
    asked = [questions[i] for i in rng.permutation(len(questions))[: int(rng.integers(2, 4))]]
    messages = [
        ("system", BRIEFING_SYSTEM),
        ("user", f"Article: {event.article}\nWhat is the headline?"),
        ("assistant", event.headline),
    ]
    for question, answer in asked:
        messages += [("user", question), ("assistant", answer)]
    return Dialogue(tuple(messages))


@functools.cache
def briefing_task() -> DialogueTask:
    """The built-in multi-turn task ``briefing``: fixed, disjoint splits from one seed."""
    rng = np.random.default_rng(_BRIEFING_SEED)
    seen: set = set()
    pool: list[Dialogue] = []
    while len(pool) < sum(BRIEFING_SPLIT_SIZES.values()):
        dialogue = _briefing_dialogue(rng)
        if dialogue.messages[1] not in seen:  # distinct articles: the splits cannot overlap
            seen.add(dialogue.messages[1])
            pool.append(dialogue)
    splits, start = {}, 0
    for split in SPLITS:
        splits[split] = tuple(pool[start : start + BRIEFING_SPLIT_SIZES[split]])
        start += BRIEFING_SPLIT_SIZES[split]
    return DialogueTask("briefing", splits)


DIALOGUE_TASKS = {"briefing": briefing_task}


class DialogueWindows(Sequence):
    """Every agent-turn window of some conversations, as dialogues of one agent turn: RL4LMs'
    DailyDialog setting, where each utterance (of either speaker) after the first is a target and
    the ``context`` utterances before it are the opening. The target's speaker is the
    ``"assistant"``; the roles alternate back from it."""

    def __init__(self, base: Sequence[Dialogue], context: int) -> None:
        self.base, self.context = base, context
        pairs = [(i, t) for i, d in enumerate(base) for t in range(1, len(d.messages))]
        self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        self.path = getattr(base, "path", None)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i, t = (int(x) for x in self.pairs[index])
        window = self.base[i].messages[max(0, t - self.context) : t + 1]
        roles = ("assistant", "user") if len(window) % 2 else ("user", "assistant")
        messages = tuple((roles[k % 2], content) for k, (_, content) in enumerate(window))
        earlier = sum(role == "assistant" for role, _ in messages[:-1])
        return Dialogue(messages, "assistant", first_turn=earlier)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def daily_dialog_task(**dataset_kwargs) -> DialogueTask:
    """DailyDialog (``li2017dailydialog/daily_dialog``, its parquet conversion) as conversations:
    the agent is the second speaker and plays all its turns, the data responder the first.
    ``dataset_kwargs``: ``context=k`` gives RL4LMs' setting instead (each utterance after the
    first a one-turn episode opened by the ``k`` utterances before it; RL4LMs uses 5);
    ``data_files`` (local files in the hub's schema: ``dialog``, ``act``, ``emotion``),
    ``revision``, ``cache_dir`` as for the other benchmarks."""
    from textenvs.tasks.hub import benchmark_task

    kwargs = dict(dataset_kwargs)
    context = kwargs.pop("context", None)
    if context is not None and not (
        isinstance(context, int) and not isinstance(context, bool) and context >= 1
    ):
        raise ValueError(f"dataset_kwargs['context'] must be an int >= 1 or None, got {context!r}.")
    task = benchmark_task("daily_dialog", **kwargs)
    splits = {
        name: split if context is None else DialogueWindows(split, context)
        for name, split in task.splits.items()
    }
    name = "daily_dialog" if context is None else f"daily_dialog (context {context})"
    return DialogueTask(name, splits, default_reward=task.default_reward)


HUB_DIALOGUE_TASKS = {"daily_dialog": daily_dialog_task}


# ---------------------------------------------------------------------------------------------
# Files of chat messages
# ---------------------------------------------------------------------------------------------


def _dialogue_of_line(raw: bytes, where: str, agent_role: str) -> Dialogue:
    if len(raw) > MAX_SAMPLE_BYTES:
        raise DatasetFormatError(
            f"{where}: {len(raw):,} bytes, more than the {MAX_SAMPLE_BYTES:,} a conversation may "
            "hold: split it."
        )
    if not _json_depth_ok(raw):
        raise DatasetFormatError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels.")
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DatasetFormatError(f"{where}: not UTF-8 (byte {e.start}): save as UTF-8.") from e
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{where}: not valid JSON ({e.msg}).") from e
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DatasetFormatError(
            f"{where}: expected an object with a 'messages' list of "
            '{"role": ..., "content": ...} objects.'
        )
    role = record.get("agent_role", agent_role)
    try:
        return Dialogue(tuple(messages), role)
    except ValueError as e:
        raise DatasetFormatError(f"{where}: {e}") from e


def load_chat_jsonl(path: str | os.PathLike, agent_role: str = "assistant") -> tuple[Dialogue, ...]:
    """The dialogues of a JSON Lines file: one ``{"messages": [{"role": ..., "content": ...},
    ...]}`` object a line (Hugging Face's and OpenAI's chat format); an optional per-line
    ``"agent_role"`` overrides ``agent_role``. Blank lines are skipped.

    Raises:
        DatasetFormatError: naming the file, the line and what is wrong.
    """
    path = os.fspath(path)
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                out.append(_dialogue_of_line(raw, f"{path}, line {lineno}", agent_role))
    if not out:
        raise DatasetFormatError(f"{path}: no conversation; give one 'messages' object a line.")
    return tuple(out)


_HUB_TASKS: dict[tuple, DialogueTask] = {}


def resolve_dialogue_task(
    task: str | DialogueTask | None,
    dataset: str | os.PathLike | Sequence[Dialogue] | dict | None,
    dataset_kwargs: dict | None,
    agent_role: str = "assistant",
) -> DialogueTask:
    """The DialogueTask a dialogue env runs: ``dataset=`` (a chat JSONL path, a list of
    :class:`Dialogue`, or a dict of those per split) wins over ``task=`` (``"briefing"`` or a
    :class:`DialogueTask`). ``dataset_kwargs``: ``split_fractions`` / ``split_seed`` (one file cut
    into seeded disjoint splits), ``default_reward``."""
    kwargs = dict(dataset_kwargs or {})
    if dataset_kwargs is not None and not isinstance(dataset_kwargs, dict):
        raise ValueError(f"dataset_kwargs must be a dict, got {dataset_kwargs!r}.")
    if dataset is None and task in HUB_DIALOGUE_TASKS:
        key = (task, repr(sorted(kwargs.items())))
        if key not in _HUB_TASKS:  # once per process: N sub-envs share the rows
            _HUB_TASKS[key] = HUB_DIALOGUE_TASKS[task](**kwargs)
        return _HUB_TASKS[key]
    if dataset is None:
        if kwargs:
            raise ValueError(f"dataset_kwargs={kwargs!r} configure dataset=: drop them.")
        if isinstance(task, DialogueTask):
            return task
        if task is None or task in DIALOGUE_TASKS:
            return DIALOGUE_TASKS[task or "briefing"]()
        raise ValueError(
            f"task={task!r} is not a dialogue task: use one of "
            f"{sorted({**DIALOGUE_TASKS, **HUB_DIALOGUE_TASKS})}, a "
            "DialogueTask, or dataset= a chat JSONL file."
        )
    fractions = kwargs.pop("split_fractions", None)
    seed = kwargs.pop("split_seed", 0)
    reward = kwargs.pop("default_reward", "rougeL")
    if kwargs:
        raise ValueError(
            f"Unknown dataset_kwargs {sorted(kwargs)} for a dialogue dataset: the keys are "
            "split_fractions, split_seed, default_reward."
        )

    def dialogues(source) -> tuple[Dialogue, ...]:
        if isinstance(source, (str, os.PathLike)):
            if not os.fspath(source).endswith(".jsonl"):
                raise ValueError(
                    f"Cannot load conversations from {os.fspath(source)!r}: give a .jsonl file of "
                    '{"messages": [...]} lines, a list of textenvs.tasks.Dialogue, or a dict of '
                    "those per split."
                )
            return load_chat_jsonl(source, agent_role)
        items = tuple(source)
        for item in items:
            if not isinstance(item, Dialogue):
                raise TypeError(
                    f"A dialogue dataset holds a {type(item).__name__}: build each conversation "
                    "with textenvs.tasks.Dialogue(messages, agent_role)."
                )
        return items

    if isinstance(dataset, dict):
        if set(dataset) != set(SPLITS):
            raise ValueError(
                f"A dataset dict needs the splits {list(SPLITS)}, got {sorted(dataset)}."
            )
        splits = {name: dialogues(dataset[name]) for name in SPLITS}
        return DialogueTask(f"dialogues {dataset['train']}", splits, default_reward=reward)
    items = dialogues(dataset)
    name = os.fspath(dataset) if isinstance(dataset, (str, os.PathLike)) else "dialogues"
    if fractions is not None:
        splits = split_samples(items, fractions, seed)
    else:
        splits = {split: items for split in SPLITS}
    return DialogueTask(name, splits, default_reward=reward)
