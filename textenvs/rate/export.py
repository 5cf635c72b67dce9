"""Ratings out of the database: TRL's preference format and a scores JSONL.

* :func:`preference_rows`: ``{"prompt", "chosen", "rejected"}`` rows, the explicit-prompt
  preference format TRL's ``RewardTrainer`` (and :mod:`agents.reward_model`) train on. A pair
  rating gives one row (a tie gives none); with ``from_scores``, two texts of the same prompt
  scored 1-5 give one row when their mean scores differ (the higher one is chosen).
* :func:`score_rows`: one row per 1-5 rating, with the rater, the item and where it came from.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from textenvs.rate.store import RatingStore


def preference_rows(store: RatingStore, from_scores: bool = True) -> list[dict]:
    """The preference rows of every pair rating (one per rater; ties give none), then, with
    ``from_scores``, those implied by 1-5 scores of different texts of one prompt."""
    items = {item.id: item for item in store.items()}
    rows: list[dict] = []
    scores: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for rating in store.ratings():
        item = items[rating.item]
        if rating.choice in ("a", "b"):
            chosen, rejected = item.texts if rating.choice == "a" else item.texts[::-1]
            rows.append({"prompt": item.prompt, "chosen": chosen, "rejected": rejected})
        elif rating.score is not None:
            scores[item.prompt][item.texts[0]].append(rating.score)
    if from_scores:
        for prompt, texts in scores.items():
            means = sorted(
                ((sum(s) / len(s), text) for text, s in texts.items()), key=lambda m: -m[0]
            )
            for i, (high, chosen) in enumerate(means):
                for low, rejected in means[i + 1 :]:
                    if high > low:
                        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def score_rows(store: RatingStore) -> list[dict]:
    """One row per 1-5 rating: ``item``, ``rater``, ``prompt``, ``text``, ``reference``,
    ``score``, ``time`` (seconds since the epoch) and ``origin``."""
    items = {item.id: item for item in store.items()}
    return [
        {
            "item": rating.item,
            "rater": rating.rater,
            "prompt": items[rating.item].prompt,
            "text": items[rating.item].texts[0],
            "reference": items[rating.item].reference,
            "score": rating.score,
            "time": rating.created,
            "origin": items[rating.item].origin,
        }
        for rating in store.ratings()
        if rating.score is not None
    ]


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """``(line number, value)`` of each non-blank line of a JSONL file; a line that is not JSON
    raises a ValueError naming the file and the line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number} is not JSON: {e}.") from e


def write_jsonl(rows: list[dict], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``rows`` as JSON lines to ``path``: to a new temporary file beside it first (a name
    no file had: nothing of the user's is touched), renamed into place once complete, so a crash
    leaves no half file. An existing file is kept unless ``overwrite``."""
    import tempfile

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give a file path for the export.")
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; nothing was written. Pass overwrite (--overwrite).")
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with open(handle, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        os.unlink(partial)
        raise
    return path
