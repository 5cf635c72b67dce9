"""Metric rewards: ROUGE from rouge-score, BLEU / chrF / TER from sacrebleu, or any user callable.

Every built-in metric is scaled to [0, 1], 1 meaning the hypothesis equals a reference:

=============  =======================================================================
name           value
=============  =======================================================================
``rouge1``     ROUGE-1 F-measure (``rouge_score.rouge_scorer``, no stemming, words of every
               script: :class:`UnicodeTokenizer`), max over references
``rouge2``     ROUGE-2 F-measure, as above
``rougeL``     ROUGE-L F-measure, as above
``rougeLsum``  ROUGE-Lsum F-measure (sentences split on newlines), as above
``bleu``       sacrebleu ``BLEU(effective_order=True)`` sentence score / 100 (default ``exp``
               smoothing, ``13a`` tokenizer), all references at once
``chrf``       sacrebleu ``CHRF()`` sentence score (chrF2, character 6-grams) / 100
``ter``        ``1 - min(TER, 100) / 100`` with sacrebleu ``TER()``: TER is an error rate, so it
               is turned into a score where higher is better and a perfect hypothesis gets 1
=============  =======================================================================

A user callable ``(hypothesis: str, references: Sequence[str]) -> float`` is used as it is; it
must return a finite number (a NaN or infinity raises, never reaches an agent).

Model-based metrics (:mod:`textenvs.model_rewards`): ``"bertscore"``, ``"classifier"`` and
``"lm_score"`` (configured by ``reward_kwargs``) and
:class:`~textenvs.model_rewards.BatchMetric`, a user's batch callable
``(texts, references) -> list[float]``. A batched vector env scores all its sub-envs' texts of a
step in one call of such a metric. They pay the score once at the end by default
(``dense=None``); ``dense=True`` scores every step.

Weighted sums of named metrics: ``reward={"classifier": 0.75, "rougeL": 0.25}``
(:class:`WeightedMetric`; ``reward_kwargs`` then maps a part's name to its settings, and each
part's value is reported as ``info["metric_<name>"]``).

Shaping (:class:`RewardShaper`): the scored quantity is
``score(text) = metric(text) - length_penalty * length_mismatch(text) - repetition_penalty *
repeats(text)``.
Dense mode pays ``score(text_t) - score(text_{t-1})`` each step, so an episode's rewards sum to
``score(final) - score(start)``; terminal mode pays ``score(final)`` once at the end. The two
guardrails are off (0.0) by default:

* ``length_mismatch``: ``|words(text) - words(closest reference)| / words(closest reference)``,
  discouraging outputs much longer or shorter than a reference.
* ``repeats``: the number of repeated word n-grams (``repetition_ngram``, default 3) in the text,
  discouraging degenerate loops.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from rouge_score import rouge_scorer, scoring
from rouge_score import tokenizers as rouge_tokenizers
from sacrebleu.metrics import BLEU, CHRF, TER

MetricFn = Callable[[str, Sequence[str]], float]

ROUGE_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
SACREBLEU_METRICS = ("bleu", "chrf", "ter")
METRIC_NAMES = ROUGE_METRICS + SACREBLEU_METRICS


# Scripts written without spaces between words: each character is a token (as ROUGE is computed
# for Chinese and Japanese), Hiragana, Katakana, CJK ideographs and Thai.
_UNSPACED = "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_NON_WORD = re.compile(r"[\W_]+")
_PIECES = re.compile(f"[{_UNSPACED}]|[^{_UNSPACED}]+")


class UnicodeTokenizer(rouge_tokenizers.Tokenizer):
    """rouge-score's default tokenizer for every script, not only a-z and 0-9.

    rouge-score lowercases and keeps only ``[a-z0-9]`` runs, so a Russian or Japanese hypothesis
    equal to its reference scores 0. This keeps every Unicode letter and digit run instead (one
    token per character in scripts without spaces). On ASCII text it returns exactly rouge-score's
    tokens, so English scores are unchanged.
    """

    def tokenize(self, text: str) -> list[str]:
        words = _NON_WORD.sub(" ", text.lower()).split()
        if all(word.isascii() for word in words):
            return words
        return [piece for word in words for piece in _PIECES.findall(word)]


class _RememberingTokenizer(rouge_tokenizers.Tokenizer):
    """:class:`UnicodeTokenizer`, remembering the texts it has tokenised.

    A dense reward scores the same references at every step of an episode; remembering their
    tokens halves the tokenising work of each score. The memory is dropped every ``size`` texts.
    """

    def __init__(self, size: int = 256) -> None:
        self.inner = UnicodeTokenizer()
        self._seen: dict[str, list[str]] = {}
        self._size = size

    def tokenize(self, text: str) -> list[str]:
        tokens = self._seen.get(text)
        if tokens is None:
            if len(self._seen) >= self._size:
                self._seen.clear()
            tokens = self._seen[text] = self.inner.tokenize(text)
        return tokens


class _LcsRows:
    """The rows of rouge-score's LCS table of one reference against a hypothesis that changes a
    little per call.

    rouge-score builds the whole ``len(reference) x len(hypothesis)`` table for every score. An
    environment scores a text that grows by a token (or is edited at one place) per step, so the
    rows of the hypothesis tokens that did not change are kept and only the rows from the first
    changed token on are recomputed: the same recurrence, the same LCS length, a fraction of the
    work.
    """

    def __init__(self, reference: list[str]) -> None:
        self.reference = reference
        self.hypothesis: list[str] = []
        self.rows = [[0] * (len(reference) + 1)]  # rows[j]: the table row after j hypothesis tokens

    def lcs(self, hypothesis: list[str]) -> int:
        """Length of the longest common subsequence of the reference and ``hypothesis``."""
        keep, old = 0, self.hypothesis
        for new_token, old_token in zip(hypothesis, old):
            if new_token != old_token:
                break
            keep += 1
        del self.rows[keep + 1 :]
        ref = self.reference
        for token in hypothesis[keep:]:
            prev, row = self.rows[-1], [0]
            for j, ref_token in enumerate(ref):
                row.append(prev[j] + 1 if ref_token == token else max(row[j], prev[j + 1]))
            self.rows.append(row)
        self.hypothesis = list(hypothesis)
        return self.rows[-1][-1]


class RougeMetric:
    """ROUGE F-measure from ``rouge_score``, the best over the references.

    ROUGE-L keeps the LCS rows of the last hypothesis per reference (:class:`_LcsRows`) and
    scores with rouge-score's F-measure and :class:`UnicodeTokenizer`, so it returns exactly
    ``RougeScorer(tokenizer=UnicodeTokenizer())``'s value (on ASCII text, the default
    ``RougeScorer``'s) while a step that appends a token costs one or two new rows instead of a
    table.
    """

    def __init__(self, kind: str) -> None:
        self.kind = self.__name__ = kind
        self._tokenizer = _RememberingTokenizer()
        self._scorer = rouge_scorer.RougeScorer(
            [kind], use_stemmer=False, tokenizer=self._tokenizer
        )
        self._lcs: dict[str, _LcsRows] = {}

    def __call__(self, hypothesis: str, references: Sequence[str]) -> float:
        if self.kind == "rougeL":
            return max(self._rouge_l(hypothesis, references))
        # rougeLsum expects sentences on separate lines; the other kinds ignore newlines.
        return max(self._scorer.score(ref, hypothesis)[self.kind].fmeasure for ref in references)

    def _rouge_l(self, hypothesis: str, references: Sequence[str]):
        if len(self._lcs) > len(references) or any(ref not in self._lcs for ref in references):
            self._lcs = {ref: _LcsRows(self._tokenizer.tokenize(ref)) for ref in references}
        hyp = self._tokenizer.inner.tokenize(
            hypothesis
        )  # a new text each step: nothing to remember
        for ref in references:
            rows = self._lcs[ref]
            if not hyp or not rows.reference:  # rouge-score's convention for an empty side
                yield 0.0
                continue
            lcs = rows.lcs(hyp)
            yield scoring.fmeasure(lcs / len(hyp), lcs / len(rows.reference))

    def __reduce__(self):
        return RougeMetric, (self.kind,)


def _clip01(x: float) -> float:
    # sacrebleu can give 100.00000000000004 for an exact match; keep the documented [0, 1] range.
    return min(max(x, 0.0), 1.0)


def _call_method(cls: type):
    """The ``__call__`` a class defines or inherits, as stored (an lru_cache wrapper stays one)."""
    return next((c.__dict__["__call__"] for c in cls.__mro__ if "__call__" in c.__dict__), None)


class SacreBleuMetric:
    """A sacrebleu sentence metric scaled to [0, 1] (TER turned into ``1 - TER``)."""

    _CLASSES = {"bleu": lambda **kw: BLEU(effective_order=True, **kw), "chrf": CHRF, "ter": TER}

    # sacrebleu's tokenizers remember up to 2**16 tokenized texts in a process-wide LRU cache; an
    # env scores a new text every step, so that cache would grow for 65,536 steps (tens of MB).
    # It is emptied once it holds this many texts: memory stays flat, references are re-tokenized.
    CACHE_LIMIT = 2048

    def __init__(self, kind: str) -> None:
        self.kind = self.__name__ = kind
        self._metric = self._CLASSES[kind]()
        self._references: tuple[str, ...] | None = None  # those self._kept holds
        self._kept = None
        # the tokenizer and the tokenizers it calls (13a runs a regexp tokenizer after its own)
        tokenizer = getattr(self._metric, "tokenizer", None)
        parts = [tokenizer, *getattr(tokenizer, "__dict__", {}).values()]
        methods = dict.fromkeys(_call_method(type(part)) for part in parts)
        self._token_caches = [m for m in methods if hasattr(m, "cache_info")]

    # chrF spends about a third of a sentence score on the references' character n-grams, and an
    # env scores the same references every step of an episode: a metric built with them
    # (sacrebleu keeps their statistics) scores chrF in 0.18 ms instead of 0.29, the same numbers.
    # BLEU's and TER's reference work is too small to repay a metric per episode (0.125 ms against
    # 0.106 for BLEU, 1.40 against 1.34 for TER; 3,160 prefixes of 300 Translate samples).
    KEEPS_REFERENCES = frozenset({"chrf"})

    def __call__(self, hypothesis: str, references: Sequence[str]) -> float:
        for cache in self._token_caches:
            if cache.cache_info().currsize > self.CACHE_LIMIT:
                cache.cache_clear()
        if self.kind in self.KEEPS_REFERENCES:
            score = self._with_references(tuple(references)).corpus_score([hypothesis], None).score
        else:
            score = self._metric.sentence_score(hypothesis, list(references)).score
        if self.kind == "ter":
            return _clip01(1.0 - min(score, 100.0) / 100.0)
        return _clip01(score / 100.0)

    def _with_references(self, references: tuple[str, ...]):
        """A metric holding the statistics of ``references`` (the last one, or a new one)."""
        if self._references != references:
            self._kept = self._CLASSES[self.kind](references=[[r] for r in references])
            self._references = references
        return self._kept

    def __reduce__(self):
        return SacreBleuMetric, (self.kind,)


def get_metric(
    reward: str | MetricFn, reward_kwargs: dict | None = None, device: str = "cpu"
) -> MetricFn:
    """The metric function for a name in :data:`METRIC_NAMES` or
    :data:`~textenvs.model_rewards.MODEL_METRICS`, or a user callable.

    ``reward_kwargs`` configure a model-based metric (loaded once per process, on ``device``
    unless they name another); other metrics take none.

    Raises:
        ValueError: for an unknown name, listing the valid ones, or reward_kwargs given to a
            metric that takes none.
    """
    from textenvs.model_rewards import MODEL_METRICS, shared_metric

    if isinstance(reward, dict):
        return weighted_metric(reward, reward_kwargs, device)
    if reward in MODEL_METRICS:
        return shared_metric(reward, reward_kwargs, device)
    if reward_kwargs:
        raise ValueError(
            f"reward_kwargs={reward_kwargs!r} configure the model-based rewards "
            f"{list(MODEL_METRICS)}; reward={metric_name(reward)!r} takes none: drop them."
        )
    if callable(reward):
        return reward
    if reward in ROUGE_METRICS:
        return RougeMetric(reward)
    if reward in SACREBLEU_METRICS:
        return SacreBleuMetric(reward)
    raise ValueError(
        f"Unknown reward {reward!r}: use one of {list(METRIC_NAMES + MODEL_METRICS)}, a callable "
        "(hypothesis: str, references: list[str]) -> float, or "
        "textenvs.model_rewards.BatchMetric(fn) for a batch callable."
    )


class WeightedMetric:
    """A weighted sum of named metrics, ``reward={"classifier": 0.75, "rougeL": 0.25}`` (RL4LMs'
    DailyDialog reward is 0.75 x an intent classifier + 0.25 x METEOR).

    ``last_parts`` holds each part's value of the last call (the envs report them as
    ``info["metric_<name>"]``).
    """

    def __init__(self, parts: dict[str, tuple[MetricFn, float]]) -> None:
        self.parts = parts
        self.__name__ = "+".join(f"{weight:g}*{name}" for name, (_, weight) in parts.items())
        self.last_parts: dict[str, float] = {}

    def _value(self, metric: MetricFn, hypothesis: str, references, prompt: str) -> float:
        if getattr(metric, "uses_prompt", False):
            return float(metric(hypothesis, references, prompt))
        return float(metric(hypothesis, references))

    def __call__(self, hypothesis: str, references: Sequence[str], prompt: str = "") -> float:
        self.last_parts = {
            name: self._value(metric, hypothesis, references, prompt)
            for name, (metric, _) in self.parts.items()
        }
        return sum(weight * self.last_parts[name] for name, (_, weight) in self.parts.items())


class BatchedWeightedMetric(WeightedMetric):
    """A :class:`WeightedMetric` with a model-based part: a batched vector env prefetches every
    model-based part's scores of a step in one batch each."""

    uses_prompt = True  # handed the prompt, which each part that reads it gets

    def prefetch(self, items: list) -> None:
        for metric, _ in self.parts.values():
            if hasattr(metric, "prefetch"):
                metric.prefetch(items)


def weighted_metric(weights: dict, reward_kwargs: dict | None, device: str) -> WeightedMetric:
    """The :class:`WeightedMetric` of ``{name: weight}``; ``reward_kwargs`` maps a model-based
    part's name to its settings (``{"classifier": {"model": ...}}``)."""
    kwargs = dict(reward_kwargs or {})
    if not weights:
        raise ValueError("reward={} names no metric: give {name: weight, ...}.")
    unknown = set(kwargs) - set(weights)
    if unknown:
        raise ValueError(
            f"reward_kwargs keys {sorted(unknown)} name no part of reward={weights!r}: with a "
            "weighted sum, reward_kwargs maps a part's name to its settings."
        )
    parts = {}
    for name, weight in weights.items():
        if not isinstance(name, str):
            raise ValueError(f"reward={weights!r}: the parts are metric names (str), got {name!r}.")
        ok = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not (ok and math.isfinite(weight)):
            raise ValueError(
                f"reward={weights!r}: the weight of {name!r} must be a finite number, got "
                f"{weight!r}."
            )
        part_kwargs = kwargs.get(name)
        if part_kwargs is not None and not isinstance(part_kwargs, dict):
            raise ValueError(f"reward_kwargs[{name!r}] must be a dict, got {part_kwargs!r}.")
        parts[name] = (get_metric(name, part_kwargs, device), float(weight))
    batched = any(hasattr(metric, "prefetch") for metric, _ in parts.values())
    return (BatchedWeightedMetric if batched else WeightedMetric)(parts)


def _terminal_only(metric: MetricFn) -> bool:
    """Whether ``metric`` (or a part of a weighted sum) may score only finished texts."""
    parts = getattr(metric, "parts", None)
    if parts is not None:
        return any(_terminal_only(part) for part, _ in parts.values())
    return bool(getattr(metric, "terminal_only", False))


def metric_name(reward: str | MetricFn) -> str:
    return reward if isinstance(reward, str) else getattr(reward, "__name__", type(reward).__name__)


def repeated_ngrams(text: str, n: int = 3) -> int:
    """How many word n-grams of ``text`` are repeats of an earlier one."""
    words = text.split()
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return sum(c - 1 for c in counts.values())


def length_mismatch(text: str, references: Sequence[str]) -> float:
    """Relative word-count distance to the closest reference (0 when some reference has the same
    length).
    """
    n = len(text.split())
    return min(abs(n - len(r.split())) / max(len(r.split()), 1) for r in references)


MAX_WEIGHT = 1000.0
"""The largest guardrail weight or cost an env accepts: every reward stays a finite number."""


def check_weight(name: str, value: object, zero_means: str = "0 means none") -> float:
    """A guardrail weight or a cost: a finite number in [0, :data:`MAX_WEIGHT`], else ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and 0 <= value <= MAX_WEIGHT):
        raise ValueError(
            f"{name} must be a finite number in [0, {MAX_WEIGHT:g}] ({zero_means}), got {value!r}."
        )
    return float(value)


@dataclass
class RewardShaper:
    """Turns a metric into per-step rewards for one episode at a time.

    Args:
        reward: A metric name from :data:`METRIC_NAMES` or
            :data:`~textenvs.model_rewards.MODEL_METRICS`, a callable ``(hyp, refs) -> float``
            or a :class:`~textenvs.model_rewards.BatchMetric`.
        dense: Pay the change of the score every step (True) or the score once at the end
            (False); None: dense for the string metrics, terminal for model-based ones.
        length_penalty: Weight of the length guardrail (0 turns it off).
        repetition_penalty: Weight of the repetition guardrail (0 turns it off).
        repetition_ngram: The n of the repeated n-grams counted by the repetition guardrail.
        reward_kwargs: The settings of a model-based metric (see :mod:`textenvs.model_rewards`).
        device: Where a model-based metric runs unless ``reward_kwargs`` names a device.
    """

    reward: str | MetricFn = "rougeL"
    dense: bool | None = None
    length_penalty: float = 0.0
    repetition_penalty: float = 0.0
    repetition_ngram: int = 3
    reward_kwargs: dict | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.metric = get_metric(self.reward, self.reward_kwargs, self.device)
        self.name = metric_name(self.reward if isinstance(self.reward, str) else self.metric)
        # a model-based metric scores a batch in one forward and is read, not recomputed
        self.batched = hasattr(self.metric, "prefetch")
        if self.dense is None:
            self.dense = not self.batched
        if not isinstance(self.dense, (bool, np.bool_)):
            raise ValueError(f"dense must be True, False or None, got {self.dense!r}.")
        self.dense = bool(self.dense)
        if self.dense and _terminal_only(self.metric):
            raise ValueError(
                f"reward={self.name!r} is scored once per episode (people rate finished texts, "
                "not every token): pass dense=False or leave dense unset."
            )
        self.prompt = ""
        for field in ("length_penalty", "repetition_penalty"):
            check_weight(field, getattr(self, field), "0 turns it off")
        if not (isinstance(self.repetition_ngram, int) and self.repetition_ngram >= 1):
            raise ValueError(
                f"repetition_ngram must be an int >= 1, got {self.repetition_ngram!r}."
            )
        self.references: tuple[str, ...] = ()
        self._last_score = 0.0

    def score(self, text: str) -> dict[str, float]:
        """The metric, the guardrail terms and the shaped ``score`` of ``text`` against the
        references.
        """
        if self.batched and self.metric.uses_prompt:
            raw = self.metric(text, self.references, self.prompt)
        else:
            raw = self.metric(text, self.references)
        try:
            value = float(raw)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"Reward metric {self.name!r} returned {raw!r} for hypothesis {text!r}: a reward "
                "metric must return a finite number."
            ) from e
        if not math.isfinite(value) or isinstance(raw, (bool, str)):
            raise ValueError(
                f"Reward metric {self.name!r} returned {value} for hypothesis {text!r}: a reward "
                "metric must return a finite number."
            )
        out = {self.name: value, "score": value}
        for part, part_value in getattr(self.metric, "last_parts", {}).items():
            out[f"metric_{part}"] = part_value
        if self.length_penalty:
            out["length_mismatch"] = length_mismatch(text, self.references)
            out["score"] -= self.length_penalty * out["length_mismatch"]
        if self.repetition_penalty:
            out["repeated_ngrams"] = float(repeated_ngrams(text, self.repetition_ngram))
            out["score"] -= self.repetition_penalty * out["repeated_ngrams"]
        return out

    def start(
        self, references: Sequence[str], text: str = "", prompt: str = ""
    ) -> dict[str, float]:
        """Begin an episode. Dense rewards are measured from the score of the start ``text``.

        For generation the start text is empty and the baseline is 0, so the dense rewards of an
        episode sum to the terminal score; for editing the start text is scored. ``prompt`` is
        what a metric that reads it (a reward model) scores the texts with.
        """
        self.references = tuple(references)
        self.prompt = prompt
        scores = self.score(text)
        self._last_score = scores["score"] if text else 0.0
        return scores

    def step(
        self, text: str, done: bool, scores: dict[str, float] | None = None
    ) -> tuple[float, dict[str, float]]:
        """The reward for reaching ``text``; ``done`` marks the episode's last step.

        ``scores`` may pass ``self.score(text)`` when the caller has computed it already.
        """
        scores = self.score(text) if scores is None else scores
        if self.dense:
            reward = scores["score"] - self._last_score
        else:
            reward = scores["score"] if done else 0.0
        if not math.isfinite(reward):  # a user metric of values near the float limit
            raise FloatingPointError(
                f"The reward for {text!r} is {reward} (score {scores['score']}, previous "
                f"{self._last_score}): scale the metric {self.name!r} to ordinary magnitudes."
            )
        self._last_score = scores["score"]
        return reward, scores
