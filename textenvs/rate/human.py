"""``reward="human"``: a person's 1-5 rating of each finished episode's text, as its reward.

Each text to score (every sub-env that ends at a vector step, in one batch) becomes a "live" item
of a ratings database, which the rating page shows before anything else; the env waits until each
has a rating and pays ``(score - 1) / 4``, in [0, 1]. Built for small studies: a few dozen episodes
of RL from human scores on the tiny model, rated as they come.

* **The page.** ``serve=True`` (default) starts the rating page in this process on ``host:port``
  when the first text waits, and prints its address; open it and rate. With several processes
  (``SubprocVecEnv``), serve one page yourself (``python -m textenvs.rate serve --db F``) and
  pass ``serve=False`` to every env.
* **Waiting.** ``timeout`` seconds per batch (default 3600; None waits for ever). Past it,
  ``on_timeout="raise"`` (default) raises a ``TimeoutError`` (the items stay in the database and
  are shown first when a run starts again), ``on_timeout="default"`` pays ``default`` for each text
  not rated yet (and the rating still lands in the database, for the reward model later).
* **Ratings kept.** A text already rated in this database for the same prompt (by any rater) is
  paid its rating at once: the mean of every rating it has when it is asked for. An empty text
  pays 0 without asking anyone, as every model-based reward.
* **Terminal only.** ``dense=True`` is refused: no one rates every token.
"""

from __future__ import annotations

import os
import sys
import time

from textenvs.checks import check_choice, check_float
from textenvs.model_rewards import BatchedMetric
from textenvs.rate.store import Item, RatingStore

ON_TIMEOUT = ("raise", "default")


def reward_of_score(score: float) -> float:
    """A 1-5 rating as a reward in [0, 1]: ``(score - 1) / 4``."""
    return (score - 1.0) / 4.0


class HumanRating(BatchedMetric):
    """People's 1-5 ratings of the texts, on the rating page, as a terminal reward in [0, 1].

    Args:
        db: The ratings database file (created if missing).
        serve: Start the rating page in this process (False: one is served elsewhere).
        host: The page's address (any but loopback requires a token; one is made up if None).
        port: The page's port (0: any free one; the printed address says which).
        token: The page's access token.
        timeout: Seconds to wait for a batch's ratings (None: for ever).
        on_timeout: ``"raise"`` a ``TimeoutError``, or pay ``default`` for the unrated texts.
        default: The reward of a text not rated in time, with ``on_timeout="default"``.
        poll: Seconds between looks at the database while waiting.
        device: Unused (every reward takes it).
    """

    terminal_only = True
    uses_prompt = True  # the rater sees the prompt

    def __init__(
        self,
        db: str | os.PathLike | None = None,
        serve: bool = True,
        host: str = "127.0.0.1",
        port: int = 8765,
        token: str | None = None,
        timeout: float | None = 3600.0,
        on_timeout: str = "raise",
        default: float = 0.5,
        poll: float = 0.5,
        device: str = "cpu",
    ) -> None:
        super().__init__()
        if db is None:
            raise ValueError(
                "reward='human' needs reward_kwargs={'db': 'ratings.sqlite'}: the ratings "
                "database where the texts wait for people's scores."
            )
        check_choice("on_timeout", on_timeout, ON_TIMEOUT)
        if timeout is not None:
            check_float("timeout", timeout, 0, low_open=True)
        check_float("default", default)
        check_float("poll", poll, 0, low_open=True)
        self.__name__ = "human"
        self.store = RatingStore(db)
        self.timeout, self.on_timeout, self.default, self.poll = timeout, on_timeout, default, poll
        self.serve, self.address, self.server = serve, (host, port, token), None

    def _start_page(self) -> None:
        """Serve the rating page, once: when the first text waits for a rating."""
        from textenvs.rate.app import RatingServer

        self.server = RatingServer(self.store, *self.address, refresh=2).start()
        print(
            f"reward='human': rate the episodes at {self.server.url} "
            f"(ratings go to {self.store.path})",
            file=sys.stderr,
            flush=True,
        )

    def score_batch(self, texts, references, prompts) -> list[float]:
        items = [
            Item(prompt, (text,), refs[0] if refs else "", {"reward": "human"})
            for text, refs, prompt in zip(texts, references, prompts)
        ]
        ids = self.store.add(items, live=True)
        if self.serve and self.server is None:
            self._start_page()
        start = time.monotonic()
        while True:
            scores = self.store.scores(ids)
            missing = sum(not s for s in scores.values())
            if not missing:
                break
            if self.timeout is not None and time.monotonic() - start >= self.timeout:
                if self.on_timeout == "raise":
                    self._raise_timeout(missing, len(ids))
                break  # on_timeout="default"
            time.sleep(self.poll)
        return [
            reward_of_score(sum(scores[i]) / len(scores[i])) if scores[i] else float(self.default)
            for i in ids
        ]

    def _raise_timeout(self, missing: int, asked: int) -> None:
        where = f" at {self.server.url}" if self.server else " on the rating page"
        raise TimeoutError(
            f"reward='human': {missing} of {asked} texts had no rating after "
            f"{self.timeout:g} s. Rate them{where}; they stay in {self.store.path} and are "
            "shown first. Or pass reward_kwargs={'timeout': None} (wait for ever) or "
            "{'on_timeout': 'default'}."
        )

    def close(self) -> None:
        """Stop the rating page this reward started."""
        if self.server is not None:
            self.server.stop()
            self.server = None
