"""How a sample's prompt is fitted to the model's context, shared by every env
(:class:`PromptFitting`, a part of :class:`~textenvs.envs.base.TextEnv`): the prompt's tokens
(plain or through the chat template), the context limit (the model's positions, ``obs="context"``'s
positions, ``max_prompt_tokens``), and what a prompt that does not fit gets at construction,
``too_long=``: ``"error"`` (refused with the samples named), ``"skip"`` (left out, with a
warning) or ``"truncate"`` (the source cut when drawn, never the template or the budget). The
token counts are computed once per process per split.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence

import numpy as np

from textenvs.lm import LanguageModel
from textenvs.tasks import Sample, Task
from textenvs.tasks.loaders import SampleSubset

_LENGTHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# A prompt's prefix of this many characters per token of the limit says whether it is longer than
# the limit (English BPE runs at about 4 characters a token); one that does not say is counted
# whole, so the count is exact whatever the text.
CHARS_PER_TOKEN_SHOWN = 6


# A split of more samples than this has its share of over-long prompts measured on a seeded
# subset of TRUNCATION_SUBSET when too_long="truncate" (cutting needs no count): CNN/DM's 287k
# train articles are not all tokenized before the first episode.
EXACT_TRUNCATION_COUNT = 20_000


TRUNCATION_SUBSET = 2_000


def count_prompt_tokens(
    task: Task,
    samples: Sequence[Sample],
    lm: LanguageModel,
    chat_template: bool = False,
    beyond: int | None = None,
) -> list[int]:
    """The token count of each sample's prompt (rendered as a user turn with
    ``chat_template``). ``beyond=n``: a prompt longer than ``n`` tokens may be counted only as far
    as a prefix of it shows that it is (a lower bound above ``n``), which is all that cutting
    sources to ``n`` tokens needs; long articles are not tokenized whole."""
    chars = None if beyond is None else CHARS_PER_TOKEN_SHOWN * (beyond + 2)
    lengths: list[int] = []
    for start in range(0, len(samples), 1024):  # batches keep the memory of a large split flat
        prompts = [task.prompt(s) for s in samples[start : start + 1024]]
        shown = prompts if chars is None else [p[:chars] for p in prompts]
        counts = [len(ids) for ids in lm.encode_prompts(shown, chat_template)]
        # a prefix whose count is not clearly above `beyond` (a token may straddle the cut) says
        # nothing about the whole prompt: count those whole
        unsure = [
            i
            for i, (p, c) in enumerate(zip(prompts, counts))
            if chars is not None and len(p) > chars and c <= beyond + 1
        ]
        for i, ids in zip(unsure, lm.encode_prompts([prompts[i] for i in unsure], chat_template)):
            counts[i] = len(ids)
        lengths += counts
    return lengths


def prompt_lengths(
    task: Task,
    split: str,
    lm: LanguageModel,
    chat_template: bool = False,
    beyond: int | None = None,
) -> np.ndarray:
    """``(n,)`` int32: :func:`count_prompt_tokens` of every sample of a split, computed once per
    process."""
    per_task = _LENGTHS.setdefault(task, {})
    key = (split, lm.name, chat_template, beyond)
    if key not in per_task:
        counts = count_prompt_tokens(task, task.split(split), lm, chat_template, beyond)
        per_task[key] = np.asarray(counts, dtype=np.int32)
    return per_task[key]


class PromptFitting:
    """The prompt-fitting part of :class:`~textenvs.envs.base.TextEnv` (its ``lm``, ``task``,
    ``split``, ``samples``, ``too_long``, ``chat_template``, ``max_prompt_tokens``,
    ``max_steps``)."""

    def _check_split_fits(self) -> None:
        """Refuse at construction a budget or a sample that could never fit the model's context.

        Called by each subclass once its budget (:meth:`_context_budget`) is set, so a vector env
        is never stuck at the reset that happens to draw an over-long sample.
        """
        budget_name, budget = self._context_budget()
        limit, where, remedy = self._prompt_limit()
        if budget >= limit:
            raise ValueError(
                f"{budget_name}={budget} leaves no room for a prompt in {where}: lower "
                f"{budget_name}."
            )
        if self.too_long == "truncate" and len(self.samples) > EXACT_TRUNCATION_COUNT:
            self._measure_truncation(limit - budget, budget_name, budget, where, remedy)
            return
        beyond = limit - budget if self.too_long == "truncate" else None
        lengths = prompt_lengths(self.task, self.split, self.lm, self.chat_template, beyond)
        fits = lengths + budget <= limit
        over = np.flatnonzero(~fits)
        self._prompt_lengths = lengths[fits]  # of the samples the env plays
        if not len(over):
            return
        if self.too_long == "truncate":
            self._check_truncation_fits(limit - budget, budget_name, budget, where, remedy)
            self._prompt_lengths = np.minimum(lengths, limit - budget)
            warnings.warn(
                f"{len(over)} of the {len(lengths)} samples of split {self.split!r} have a prompt "
                f"longer than {limit - budget} tokens ({where} less {budget_name}={budget}): "
                "their sources are cut to fit (too_long='truncate').",
                UserWarning,
                stacklevel=4,
            )
            return
        line = getattr(self.samples, "line_of", None)
        shown = [
            f"{i} (line {line(i)})" if line and line(i) else str(i) for i in over[:10].tolist()
        ]
        what = (
            f"{len(over)} of the {len(lengths)} samples of split {self.split!r}"
            + (f" of {self.samples.path}" if getattr(self.samples, "path", None) else "")
            + f" (samples {', '.join(shown)}{', ...' if len(over) > 10 else ''}; the longest "
            f"prompt has {int(lengths.max())} tokens) do not fit {where} with "
            f"{budget_name}={budget}"
        )
        if self.too_long == "error":
            raise ValueError(
                f"{what}: shorten or drop them, pass too_long='skip' (drop them) or "
                f"too_long='truncate' (cut their sources), lower {budget_name}, or {remedy}."
            )
        if len(over) == len(lengths):  # too_long="skip" would leave nothing to play
            raise ValueError(
                f"{what}: that is every sample, so too_long='skip' leaves none. Pass "
                f"too_long='truncate' (cut the sources to fit), lower {budget_name}, or {remedy}."
            )
        warnings.warn(f"{what}; skipped (too_long='skip').", UserWarning, stacklevel=4)
        self.samples = SampleSubset(self.samples, np.flatnonzero(fits))

    def prompt_lengths(self) -> np.ndarray:
        """``(len(samples),)`` int32: the token count of the prompt of every sample the env plays
        (its split, less those skipped with ``too_long="skip"``; at most the room left by the
        budget with ``too_long="truncate"``, and that room itself for every sample of a split
        larger than ``EXACT_TRUNCATION_COUNT``, which is not counted), counted once per
        process."""
        return self._prompt_lengths

    def _measure_truncation(
        self, room: int, budget_name: str, budget: int, where: str, remedy: str
    ) -> None:
        """``too_long="truncate"`` on a large split: every prompt is cut to ``room`` tokens when
        drawn; the share cut is measured on a seeded subset, so the env starts at once."""
        self._check_truncation_fits(room, budget_name, budget, where, remedy)
        n = len(self.samples)
        chosen = np.sort(np.random.default_rng(0).choice(n, TRUNCATION_SUBSET, replace=False))
        counts = count_prompt_tokens(
            self.task, [self.samples[int(i)] for i in chosen], self.lm, self.chat_template, room
        )
        share = float(np.mean(np.asarray(counts) > room))
        self._prompt_lengths = np.full(n, room, dtype=np.int32)  # at most room: cut to fit
        warnings.warn(
            f"About {share:.0%} of the {n} samples of split {self.split!r} (measured on "
            f"{TRUNCATION_SUBSET} drawn with seed 0) have a prompt longer than {room} tokens "
            f"({where} less {budget_name}={budget}): their sources are cut to fit when drawn "
            "(too_long='truncate').",
            UserWarning,
            stacklevel=4,
        )

    def _check_truncation_fits(
        self, room: int, budget_name: str, budget: int, where: str, remedy: str
    ) -> None:
        """Refuse ``too_long="truncate"`` when the template alone leaves no room for a source."""
        fixed = len(self.encode_prompt(self.task.render("")))
        if fixed >= room:
            raise ValueError(
                f"The prompt template of task {self.task.name!r} alone takes {fixed} tokens, and "
                f"{where} less {budget_name}={budget} leaves {room}: no source fits even cut. "
                f"Lower {budget_name}, shorten the template, or {remedy}."
            )

    def encode_prompt(self, prompt: str) -> list[int]:
        """The token ids the LM reads for ``prompt``: the plain text, or with
        ``chat_template=True`` the tokenizer's chat template of one user turn and the
        generation prompt (``apply_chat_template``'s ids exactly)."""
        return self.lm.encode_prompts([prompt], self.chat_template)[0]

    def prompt_ids_of(self, sample: Sample) -> tuple[str, list[int]]:
        """The prompt of ``sample`` and its token ids, its source cut to fit the context with
        ``too_long="truncate"`` (never the template or the episode budget)."""
        prompt = self.task.prompt(sample)
        ids = self.encode_prompt(prompt)
        budget_name, budget = self._context_budget()
        room = self._prompt_limit()[0] - budget
        if self.too_long != "truncate" or len(ids) <= room:
            return prompt, ids
        source_ids = self.lm.encode(sample.source)
        keep = len(source_ids) - (len(ids) - room)
        while keep > 0:  # a cut source may tokenize a little differently in its prompt: re-check
            kept = source_ids[:keep] if self.task.cut_side == "end" else source_ids[-keep:]
            prompt = self.task.render(self.lm.decode(kept).strip())
            ids = self.encode_prompt(prompt)
            if len(ids) <= room:
                return prompt, ids
            keep -= len(ids) - room
        raise ValueError(  # _check_truncation_fits makes this unreachable for ordinary templates
            f"No part of the source of sample {sample.source[:40]!r} fits the {room} tokens left "
            f"by {budget_name}={budget}: lower {budget_name}."
        )

    def _prompt_limit(self) -> tuple[int, str, str]:
        """:meth:`_position_limit`, lowered to ``max_prompt_tokens`` + the budget where it is set
        (the prompt is cut to it, whatever the context)."""
        limit, where, remedy = self._position_limit()
        if self.max_prompt_tokens is None:
            return limit, where, remedy
        return (
            min(limit, self.max_prompt_tokens + self._context_budget()[1]),
            f"max_prompt_tokens={self.max_prompt_tokens} (with {where})",
            f"raise max_prompt_tokens, or {remedy}",
        )

    def _position_limit(self) -> tuple[int, str, str]:
        """How many positions ``prompt + text`` may take, what sets that limit and how to raise it
        (for messages): the model's context; a subclass may observe fewer (``obs="context"``)."""
        return (
            self.lm.max_positions,
            f"the context of model {self.lm.name!r} ({self.lm.max_positions} positions)",
            "use a model with a longer context",
        )

    def _context_budget(self) -> tuple[str, int]:
        """The argument that bounds the text's length in tokens, and its value (checked against the
        context).
        """
        return "max_steps", self.max_steps
