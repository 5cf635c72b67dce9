"""Human ratings: collect them on a local web page, export them, train a reward model on them.

The study loop, end to end (each step a command of ``python -m textenvs.rate``, see its
``--help``):

1. ``add``: items to rate into a ratings database (one SQLite file): an env's episodes (one text
   to score 1-5, or two to choose between: a base model against a trained one) or a JSONL of
   generations (:mod:`textenvs.rate.items`).
2. ``serve``: the rating page (:mod:`textenvs.rate.app`); several raters at once, every rating
   saved as it is given (:mod:`textenvs.rate.store`).
3. ``export``: the ratings as TRL's preference rows and as a scores JSONL
   (:mod:`textenvs.rate.export`).
4. ``python -m agents.reward_model``: a reward model trained on the preferences, then used as
   ``reward="classifier"``.

``reward="human"`` (:class:`textenvs.rate.human.HumanRating`) puts each finished episode on the
same page and pays the rating as the episode's reward.

The page needs the ``rate`` extra (``pip install 'textenvs[rate]'``); the database and the export
need nothing beyond the standard library.
"""

from textenvs.rate.store import Item, Rating, RatingStore

__all__ = ["Item", "Rating", "RatingStore"]
