"""The ratings database: items to rate and the ratings people gave, in one SQLite file.

Every rating is committed the moment it is given (SQLite's write-ahead log, one transaction per
rating), so a crash of the page, the machine or the rater's browser loses at most the rating being
typed. Several raters, several processes (the page, a :class:`~textenvs.rate.human.HumanRating`
reward waiting for scores, an export) may use one file at once. A rater rates an item at most once:
the database itself refuses a second rating of one item by one rater.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SCORES = range(1, 6)  # a score item's scale: 1 (bad) .. 5 (good)
CHOICES = ("a", "b", "tie")  # a pair item's answers: its first text, its second, neither
MAX_RATER_NAME = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    key TEXT UNIQUE NOT NULL,           -- a hash of prompt + texts: the same item is added once
    prompt TEXT NOT NULL,
    texts TEXT NOT NULL,                -- a JSON list: one text (score it) or two (prefer one)
    reference TEXT NOT NULL DEFAULT '', -- shown to the rater on request only
    origin TEXT NOT NULL DEFAULT '{}',  -- a JSON object: where the item came from
    live INTEGER NOT NULL DEFAULT 0,    -- 1: a HumanRating reward waits for it (shown first)
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY,
    item INTEGER NOT NULL REFERENCES items(id),
    rater TEXT NOT NULL,
    score INTEGER CHECK (score BETWEEN 1 AND 5),
    choice TEXT CHECK (choice IN ('a', 'b', 'tie')),
    created REAL NOT NULL,
    UNIQUE (item, rater),
    CHECK ((score IS NULL) != (choice IS NULL))
);
CREATE INDEX IF NOT EXISTS ratings_by_item ON ratings (item);
"""


@dataclass(frozen=True)
class Item:
    """One thing to rate: a prompt (the source, the conversation so far) and one text to score
    1-5 or two texts to choose between."""

    prompt: str
    texts: tuple[str, ...]
    reference: str = ""
    origin: dict = field(default_factory=dict, compare=False)
    id: int | None = field(default=None, compare=False)
    live: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not isinstance(self.reference, str):
            raise ValueError("An item's prompt and reference must be strings.")
        texts = tuple(self.texts)
        if len(texts) not in (1, 2) or not all(isinstance(t, str) for t in texts):
            raise ValueError(
                f"An item has one text (rated 1-5) or two (a preference), got {len(texts)}: "
                f"{texts!r:.200}."
            )
        object.__setattr__(self, "texts", texts)

    @property
    def kind(self) -> str:
        """``"score"`` (one text) or ``"pair"`` (two)."""
        return "score" if len(self.texts) == 1 else "pair"

    @property
    def key(self) -> str:
        """What makes two items the same: the prompt and the texts, in order."""
        raw = json.dumps([self.prompt, list(self.texts)], ensure_ascii=False)
        return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class Rating:
    """One rater's answer on one item: a ``score`` (1-5) or a ``choice`` (``"a"``, ``"b"`` or
    ``"tie"``; ``"a"`` is the item's first text, whatever order the page showed them in)."""

    item: int
    rater: str
    score: int | None
    choice: str | None
    created: float


def check_rater(name: object) -> str:
    """A rater's name, stripped; a clear error for an empty or over-long one."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("A rater needs a name (any non-empty text, for example initials).")
    name = name.strip()
    if len(name) > MAX_RATER_NAME:
        raise ValueError(f"A rater's name has at most {MAX_RATER_NAME} characters.")
    return name


def _order_key(rater: str, item_id: int) -> str:
    """Each rater sees the items in an order of their own, the same after a restart."""
    return hashlib.sha256(f"{rater}\0{item_id}".encode()).hexdigest()


def shown_swapped(rater: str, item_id: int) -> bool:
    """Whether the page shows a pair item's texts in reverse order to this rater: half the raters'
    items each way, so a preference for the left text does not become a preference for one
    policy."""
    return int(_order_key(rater, item_id)[-1], 16) % 2 == 1


class RatingStore:
    """Items and ratings in the SQLite file ``path`` (created if missing).

    Args:
        path: The database file. The same file may be opened by several processes at once.
        timeout: Seconds a writer waits for another's transaction before giving up.
    """

    def __init__(self, path: str | os.PathLike, timeout: float = 30.0) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"{self.path} is a folder: give the ratings database's file path.")
        if not self.path.parent.is_dir():
            raise ValueError(
                f"The folder of {self.path} does not exist: create it or give another path."
            )
        self.timeout = timeout
        try:
            with self._connect() as db:
                self._use_wal(db)
                db.executescript(_SCHEMA)
        except sqlite3.OperationalError:
            raise  # locked past the timeout, a read-only file: SQLite's message says which
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path} is not a ratings database (SQLite): {e}.") from e

    def _use_wal(self, db: sqlite3.Connection) -> None:
        """Switch the file to the write-ahead log (readers never block the writer; the setting
        stays with the file). The switch needs the file to itself, so while another process
        holds it, wait: SQLite does not apply its busy timeout to this one statement."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection per use (SQLite connections do not cross threads): autocommit, so each
        write below is its own ``BEGIN IMMEDIATE ... COMMIT``."""
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            yield db
        finally:
            db.close()

    # -- items ---------------------------------------------------------------------------------

    def add(self, items: Iterable[Item], live: bool = False) -> list[int]:
        """Add items (an item already there is kept, not added twice); return each one's id, in
        order. ``live``: a reward waits for them, so the page shows them first."""
        items = list(items)
        ids = []
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                for item in items:
                    db.execute(
                        "INSERT INTO items (key, prompt, texts, reference, origin, live, created) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                        "live = max(live, excluded.live)",
                        (
                            item.key,
                            item.prompt,
                            json.dumps(list(item.texts), ensure_ascii=False),
                            item.reference,
                            json.dumps(item.origin, ensure_ascii=False, sort_keys=True),
                            int(live),
                            time.time(),
                        ),
                    )
                    ids.append(db.execute("SELECT id FROM items WHERE key = ?", (item.key,)))
                ids = [cursor.fetchone()[0] for cursor in ids]
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return ids

    @staticmethod
    def _item(row: Sequence) -> Item:
        id_, prompt, texts, reference, origin, live = row
        texts, origin = tuple(json.loads(texts)), json.loads(origin)
        return Item(prompt, texts, reference, origin, id_, bool(live))

    _ITEM_COLUMNS = "id, prompt, texts, reference, origin, live"

    def item(self, item_id: int) -> Item:
        """The item with this id (a ``KeyError`` if there is none)."""
        with self._connect() as db:
            row = db.execute(
                f"SELECT {self._ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)
            ).fetchone()
        if row is None:
            raise KeyError(f"No item {item_id} in {self.path}.")
        return self._item(row)

    def items(self) -> list[Item]:
        """Every item, in the order they were added."""
        with self._connect() as db:
            rows = db.execute(f"SELECT {self._ITEM_COLUMNS} FROM items ORDER BY id").fetchall()
        return [self._item(row) for row in rows]

    def next_item(self, rater: str, ratings_per_item: int | None = None) -> Item | None:
        """The next item for ``rater``: one they have not rated, live items first (a reward waits;
        one rating each is enough), then the others in the rater's own fixed order. With
        ``ratings_per_item``, an item that many raters rated is shown to no one else. None when
        nothing is left."""
        rater = check_rater(rater)
        with self._connect() as db:
            rows = db.execute(
                "SELECT i.id, i.live, count(r.id), sum(r.rater = ?) FROM items i "
                "LEFT JOIN ratings r ON r.item = i.id GROUP BY i.id",
                (rater,),
            ).fetchall()
        live = [i for i, is_live, n, mine in rows if is_live and n == 0]
        rest = [
            i
            for i, is_live, n, mine in rows
            if not is_live and not mine and (ratings_per_item is None or n < ratings_per_item)
        ]
        if live:
            return self.item(min(live))
        if rest:
            return self.item(min(rest, key=lambda i: _order_key(rater, i)))
        return None

    # -- ratings -------------------------------------------------------------------------------

    def record(
        self, item_id: int, rater: str, score: int | None = None, choice: str | None = None
    ) -> bool:
        """Record one rating; return False (and change nothing) if this rater already rated this
        item. A score fits a one-text item, a choice a pair."""
        rater = check_rater(rater)
        item = self.item(item_id)
        if (score is None) == (choice is None):
            raise ValueError("A rating is a score (1-5) or a choice ('a', 'b', 'tie'): one.")
        if item.kind == "score":
            if isinstance(score, bool) or score not in SCORES:
                raise ValueError(f"Item {item_id} is rated with a score 1-5, got {score!r}.")
        elif choice not in CHOICES:
            raise ValueError(
                f"Item {item_id} is a pair: rate it with a choice in {CHOICES}, got {choice!r}."
            )
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO ratings (item, rater, score, choice, created) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (item, rater) DO NOTHING",
                (item_id, rater, None if score is None else int(score), choice, time.time()),
            )
        return cursor.rowcount == 1

    def ratings(self, item_id: int | None = None) -> list[Rating]:
        """Every rating (of one item), in the order given."""
        where, args = ("WHERE item = ?", (item_id,)) if item_id is not None else ("", ())
        with self._connect() as db:
            rows = db.execute(
                f"SELECT item, rater, score, choice, created FROM ratings {where} ORDER BY id",
                args,
            ).fetchall()
        return [Rating(*row) for row in rows]

    def scores(self, item_ids: Sequence[int]) -> dict[int, list[int]]:
        """The 1-5 scores each of these items has so far, in one query."""
        ids = list(dict.fromkeys(item_ids))
        out: dict[int, list[int]] = {i: [] for i in ids}
        if ids:
            with self._connect() as db:
                rows = db.execute(
                    f"SELECT item, score FROM ratings WHERE score IS NOT NULL AND item IN "
                    f"({', '.join('?' * len(ids))}) ORDER BY id",
                    ids,
                ).fetchall()
            for item, score in rows:
                out[item].append(score)
        return out

    def progress(self, rater: str) -> tuple[int, int]:
        """(items this rater rated, items in all)."""
        with self._connect() as db:
            mine = db.execute("SELECT count(*) FROM ratings WHERE rater = ?", (rater,)).fetchone()
            total = db.execute("SELECT count(*) FROM items").fetchone()
        return mine[0], total[0]

    def waiting(self) -> int:
        """How many live items (texts a ``reward="human"`` env waits for) have no rating yet."""
        with self._connect() as db:
            row = db.execute(
                "SELECT count(*) FROM items i WHERE i.live AND NOT EXISTS "
                "(SELECT 1 FROM ratings r WHERE r.item = i.id)"
            ).fetchone()
        return row[0]

    def summary(self) -> dict:
        """Counts for a status line: items (score / pair), live items still waiting for a
        rating, ratings per rater, items with two or more raters and how often those raters
        agreed (same choice; scores within 1)."""
        items = {item.id: item for item in self.items()}
        ratings = self.ratings()
        by_rater: dict[str, int] = {}
        by_item: dict[int, list[Rating]] = {}
        for r in ratings:
            by_rater[r.rater] = by_rater.get(r.rater, 0) + 1
            by_item.setdefault(r.item, []).append(r)
        agree = pairs = 0
        for rs in by_item.values():
            for i, first in enumerate(rs):
                for second in rs[i + 1 :]:
                    pairs += 1
                    if first.choice is not None:
                        agree += first.choice == second.choice
                    else:
                        agree += abs(first.score - second.score) <= 1
        return {
            "items": len(items),
            "score_items": sum(item.kind == "score" for item in items.values()),
            "pair_items": sum(item.kind == "pair" for item in items.values()),
            "live_items_waiting": self.waiting(),
            "ratings": len(ratings),
            "ratings_per_rater": by_rater,
            "items_rated_twice_or_more": sum(len(rs) >= 2 for rs in by_item.values()),
            "rater_pairs_agreeing": None if pairs == 0 else agree / pairs,
        }
