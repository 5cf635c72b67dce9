"""What a set of generated texts looks like beyond its task metric: length, diversity, fluency.

RL on a metric can buy reward with degenerate text (one safe phrase for every prompt, or word
salad a metric happens to like). These numbers, which RL4LMs reports beside its task metrics, show
it:

* ``distinct_1`` / ``distinct_2``: distinct n-grams over all n-grams of all the texts (Li et al.
  2016, "A Diversity-Promoting Objective Function for Neural Conversation Models"), words
  lowercased and split on whitespace; 1.0 when no n-gram repeats anywhere.
* ``self_bleu``: the mean BLEU (sacrebleu, sentence level, / 100) of each text against all the
  others as references (Zhu et al. 2018, Texygen); high when the texts resemble each other.
* ``perplexity``: how surprised a frozen causal LM is by the texts, ``exp`` of minus the mean,
  over texts, of each text's mean token log-probability given its prompt
  (``reward="lm_score"``'s ``logprob``, so every text weighs the same). RL4LMs scores the
  references under the policy instead; this scores every agent's texts under one fixed LM, so an
  SB3 or tabular agent gets a number too.
* ``mean_words`` and ``empty_share``: the texts' mean length in words and the share that is empty
  (empty texts are left out of the perplexity and self-BLEU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _words(text: str) -> list[str]:
    return text.lower().split()


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams, across ``texts``; 0.0 when they hold none."""
    grams = [
        tuple(words[i : i + n]) for words in map(_words, texts) for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts: Sequence[str]) -> float | None:
    """Mean sentence BLEU (/ 100) of each non-empty text against the other non-empty texts; None
    with fewer than two."""
    from sacrebleu.metrics import BLEU

    kept = [t for t in texts if t.strip()]
    if len(kept) < 2:
        return None
    bleu = BLEU(effective_order=True)
    scores = [
        bleu.sentence_score(text, kept[:i] + kept[i + 1 :]).score / 100.0
        for i, text in enumerate(kept)
    ]
    return float(np.mean(scores))


def perplexity(
    texts: Sequence[str], prompts: Sequence[str], model: str, device: str = "cpu"
) -> float | None:
    """``exp`` of minus the mean over non-empty texts of their mean token log-probability under
    the causal LM ``model`` given their prompts; None when every text is empty."""
    from textenvs.model_rewards import shared_metric

    scorer = shared_metric(
        "lm_score", {"model": model, "input": "prompt+text", "output": "logprob"}, device
    )
    kept = [(t, p) for t, p in zip(texts, prompts) if t.strip()]
    if not kept:
        return None
    logprobs = scorer.score_batch([t for t, _ in kept], [()] * len(kept), [p for _, p in kept])
    return float(math.exp(-np.mean(logprobs)))


def text_report(
    texts: Sequence[str],
    prompts: Sequence[str] | None = None,
    model: str | None = None,
    device: str = "cpu",
) -> dict:
    """``texts``, ``empty_share``, ``mean_words``, ``distinct_1``, ``distinct_2``,
    ``self_bleu`` and, given ``model`` (and the ``prompts``, one per text), ``perplexity``."""
    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError("text_report needs at least one text.")
    report = {
        "texts": len(texts),
        "empty_share": sum(not t.strip() for t in texts) / len(texts),
        "mean_words": float(np.mean([len(_words(t)) for t in texts])),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "self_bleu": self_bleu(texts),
    }
    if model is not None:
        if prompts is None or len(prompts) != len(texts):
            raise ValueError("The perplexity reads each text after its prompt: give one per text.")
        report["perplexity"] = perplexity(texts, prompts, model, device)
    return report
