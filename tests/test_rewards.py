"""Metric rewards equal the libraries' values; shaping telescopes; guardrails; bad input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF, TER

from textenvs.rewards import (
    METRIC_NAMES,
    RewardShaper,
    get_metric,
    length_mismatch,
    repeated_ngrams,
)

HYP = "Norwick council approves the park plan"
REFS = ["Norwick council approves park plan", "council backs plan for parks"]


@pytest.mark.parametrize("kind", ["rouge1", "rouge2", "rougeL", "rougeLsum"])
def test_rouge_equals_rouge_score_best_reference(kind):
    scorer = rouge_scorer.RougeScorer([kind])
    expected = max(scorer.score(r, HYP)[kind].fmeasure for r in REFS)
    assert get_metric(kind)(HYP, REFS) == pytest.approx(expected)


WORDS = ["the", "council", "Plan", "park", "plan.", "parks", "of", "a", "7", "backs", "--"]
texts = st.lists(st.sampled_from(WORDS), max_size=14).map(" ".join)


@settings(max_examples=150, deadline=None)
@given(st.lists(texts, min_size=1, max_size=3), st.lists(texts, min_size=1, max_size=12))
def test_rouge_l_reusing_rows_equals_rouge_score_over_a_sequence_of_texts(references, hypotheses):
    # The metric object keeps LCS rows between calls, as an env's steps use it: texts that grow,
    # shrink and change anywhere, references that change between episodes.
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    metric = get_metric("rougeL")
    for i, hyp in enumerate(hypotheses):
        refs = references if i % 5 < 3 else references[::-1][:1]
        expected = max(scorer.score(r, hyp)["rougeL"].fmeasure for r in refs)
        assert metric(hyp, refs) == expected


def test_rouge_l_of_a_growing_text_recomputes_only_the_changed_rows():
    metric = get_metric("rougeL")
    metric("council approves", REFS)
    rows = metric._lcs[REFS[0]]
    kept = rows.rows[1]
    metric("council approves the park", REFS)
    assert rows.rows[1] is kept and len(rows.rows) == 5  # the first token's row was not rebuilt
    metric("council rejects", REFS)
    assert rows.rows[1] is kept and len(rows.rows) == 3


@settings(max_examples=150, deadline=None)
@given(st.lists(texts, min_size=1, max_size=3), st.lists(texts, min_size=1, max_size=12))
@pytest.mark.parametrize("kind", ["bleu", "chrf", "ter"])
def test_sacrebleu_metrics_over_a_sequence_of_texts_equal_sentence_scores(
    kind, references, hypotheses
):
    # chrF keeps the references' statistics between calls: texts that change every call,
    # references that change between episodes (and back), empty texts.
    library = {"bleu": BLEU(effective_order=True), "chrf": CHRF(), "ter": TER()}[kind]
    metric = get_metric(kind)
    for i, hyp in enumerate(hypotheses):
        refs = references if i % 5 < 3 else references[::-1][:1]
        score = library.sentence_score(hyp, list(refs)).score / 100
        expected = min(max(1 - score if kind == "ter" else score, 0.0), 1.0)
        assert metric(hyp, refs) == expected


def test_sacrebleu_metrics_equal_library_values():
    assert get_metric("bleu")(HYP, REFS) == pytest.approx(
        BLEU(effective_order=True).sentence_score(HYP, REFS).score / 100
    )
    assert get_metric("chrf")(HYP, REFS) == pytest.approx(
        CHRF().sentence_score(HYP, REFS).score / 100
    )
    assert get_metric("ter")(HYP, REFS) == pytest.approx(
        1 - TER().sentence_score(HYP, REFS).score / 100
    )


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_every_metric_is_one_for_a_reference_and_in_unit_range(name):
    metric = get_metric(name)
    assert metric(REFS[0], REFS) == pytest.approx(1.0)
    for hyp in ["", "x", "plan plan plan plan plan plan plan plan plan plan plan plan"]:
        assert 0.0 <= metric(hyp, REFS) <= 1.0


def test_unknown_metric_lists_valid_names():
    with pytest.raises(ValueError, match="rougeL"):
        get_metric("rouge-l")


def test_dense_rewards_sum_to_terminal_score_with_guardrails():
    texts = [
        "Norwick",
        "Norwick council",
        "Norwick council council council",
        "Norwick council approves park plan",
    ]
    dense = RewardShaper(
        "rougeL", dense=True, length_penalty=0.3, repetition_penalty=0.2, repetition_ngram=1
    )
    terminal = RewardShaper(
        "rougeL", dense=False, length_penalty=0.3, repetition_penalty=0.2, repetition_ngram=1
    )
    dense.start(REFS)
    terminal.start(REFS)
    d = [dense.step(t, i == len(texts) - 1)[0] for i, t in enumerate(texts)]
    t = [terminal.step(t_, i == len(texts) - 1)[0] for i, t_ in enumerate(texts)]
    assert sum(d) == pytest.approx(t[-1]) and t[:-1] == [0.0] * 3
    scores = dense.score(texts[2])
    assert scores["score"] == pytest.approx(
        scores["rougeL"] - 0.3 * scores["length_mismatch"] - 0.2 * 2
    )


def test_guardrail_helpers_by_hand():
    assert (
        repeated_ngrams("a b c a b c a b", n=3) == 3
    )  # trigrams abc bca cab abc bca cab: 3 repeats
    assert length_mismatch("a b c", ["a b c d e f"]) == pytest.approx(0.5)
    assert length_mismatch("a b c", ["x y z", "a"]) == 0.0


def test_edit_start_baseline_is_the_start_text_score():
    shaper = RewardShaper("rouge1")
    start = shaper.start(REFS, text="Norwick plan")["score"]
    reward, scores = shaper.step("Norwick council approves park plan", True)
    assert reward == pytest.approx(1.0 - start)


@pytest.mark.parametrize(
    "bad", [{"length_penalty": -1.0}, {"repetition_penalty": float("inf")}, {"repetition_ngram": 0}]
)
def test_bad_shaping_arguments(bad):
    with pytest.raises(ValueError, match="must be"):
        RewardShaper("rougeL", **bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_user_metric_raises(value):
    shaper = RewardShaper(lambda h, r: value)
    with pytest.raises(ValueError, match="finite"):
        shaper.start(REFS)


@pytest.mark.parametrize("kind", ["rouge1", "rouge2", "rougeL", "rougeLsum"])
@pytest.mark.parametrize(
    "hypothesis,reference",
    [
        ("Собака видит кошку у реки", "Собака видит кошку"),
        ("犬が川の近くで猫を見る", "犬が猫を見る"),
        ("El niño comió paella", "El niño comió"),
    ],
)
def test_rouge_counts_words_of_every_script(kind, hypothesis, reference):
    from textenvs.rewards import UnicodeTokenizer

    metric = get_metric(kind)
    assert metric(reference, [reference]) == pytest.approx(1.0)  # was 0.0 with a-z only tokens
    expected = rouge_scorer.RougeScorer([kind], tokenizer=UnicodeTokenizer()).score(
        reference, hypothesis
    )
    assert metric(hypothesis, [reference]) == pytest.approx(expected[kind].fmeasure)
    assert 0.0 < metric(hypothesis, [reference]) < 1.0


@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=60))
def test_unicode_tokenizer_equals_rouge_scores_default_on_ascii(text):
    from rouge_score import tokenizers

    from textenvs.rewards import UnicodeTokenizer

    assert UnicodeTokenizer().tokenize(text) == tokenizers.DefaultTokenizer().tokenize(text)
