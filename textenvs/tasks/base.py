"""The two types every task is made of: :class:`Sample` (a source and its references) and
:class:`Task`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Sample:
    """One source text and its reference outputs (at least one)."""

    source: str
    references: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError("Sample.source is empty: every sample needs a non-empty source text.")
        refs = (self.references,) if isinstance(self.references, str) else tuple(self.references)
        if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise ValueError(
                f"Sample with source {self.source[:40]!r} has no non-empty reference: give at "
                "least one reference string."
            )
        object.__setattr__(self, "references", refs)


@dataclass(frozen=True, eq=False)
class Task:
    """A named task: samples per split and how a source becomes a prompt.

    Attributes:
        name: Task name (``summarize``, ``translate`` or a user's name for a loaded dataset).
        splits: Samples per split name.
        prompt_template: ``str.format`` template with a ``{source}`` field; the LM continues it.
        default_reward: The metric the environments use when the user names none.
        reward_kwargs: The ``reward_kwargs`` that go with ``default_reward`` (a classifier's
            label, for example); a user's ``reward_kwargs`` override them key by key.
        cut_side: Which end of a source ``too_long="truncate"`` drops: ``"end"`` (keep the
            beginning: an article's lead) or ``"start"`` (keep the end: a text to continue).
    """

    name: str
    splits: dict[str, Sequence[Sample]]
    prompt_template: str = "{source}\n"
    default_reward: str = "rougeL"
    reward_kwargs: dict = field(default_factory=dict)
    cut_side: str = "end"

    def __post_init__(self) -> None:
        # A template that needs more than {source} would only fail at the first reset.
        try:
            filled = self.prompt_template.format(source="\0")
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise ValueError(
                f"prompt_template {self.prompt_template!r} of task {self.name!r} cannot be filled "
                f"from a sample ({type(e).__name__}: {e}): a sample gives only '{{source}}'; "
                "write other braces as '{{' and '}}'."
            ) from e
        if self.cut_side not in ("end", "start"):
            raise ValueError(f"cut_side must be 'end' or 'start', got {self.cut_side!r}.")
        if "\0" not in filled:
            raise ValueError(f"prompt_template {self.prompt_template!r} must contain '{{source}}'.")

    def split(self, name: str) -> Sequence[Sample]:
        """The samples of one split; a clear error names the splits that exist."""
        if name not in self.splits:
            raise ValueError(
                f"Task {self.name!r} has no split {name!r}; choose one of {sorted(self.splits)}."
            )
        samples = self.splits[name]
        if not samples:
            raise ValueError(f"Split {name!r} of task {self.name!r} is empty.")
        return samples

    def prompt(self, sample: Sample) -> str:
        return self.render(sample.source)

    def render(self, source: str) -> str:
        """The prompt of a source text (a sample's, or one cut to fit a context)."""
        return self.prompt_template.format(source=source)
