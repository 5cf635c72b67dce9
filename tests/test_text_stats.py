"""Length, diversity and perplexity of generated texts (textenvs.text_stats), each against a
hand-computed case or a direct computation, and the evaluations that hand the texts over."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import textenvs  # noqa: F401
from agents.common import evaluate_policy, evaluate_policy_batched, with_text_stats
from textenvs.text_stats import distinct_n, perplexity, self_bleu, text_report


def test_distinct_n_by_hand():
    texts = ["The cat sat", "the cat ran", ""]
    # unigrams: the cat sat the cat ran -> 4 distinct of 6
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 3 distinct of 4
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["one"], 2) == 0.0  # no bigram at all


def test_self_bleu_is_each_text_against_the_others():
    from sacrebleu.metrics import BLEU

    texts = ["the council met on monday", "the council met on friday", "a bridge opened", " "]
    bleu = BLEU(effective_order=True)
    kept = texts[:3]
    expected = np.mean(
        [bleu.sentence_score(t, kept[:i] + kept[i + 1 :]).score / 100 for i, t in enumerate(kept)]
    )
    assert self_bleu(texts) == pytest.approx(expected)
    assert self_bleu(["same words here", "same words here"]) == pytest.approx(1.0)
    assert self_bleu(["only one", ""]) is None


def test_perplexity_equals_a_direct_computation(random_gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(random_gpt2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(random_gpt2_dir)
    texts, prompts = [" the council met", " a bridge", ""], ["Article: x.", "Article: y.", "z"]
    means = []
    for text, prompt in zip(texts[:2], prompts[:2]):
        context = tokenizer(prompt)["input_ids"]
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([context + ids])).logits[0]
        logprobs = logits[:-1].log_softmax(-1)[
            torch.arange(len(context + ids) - 1), context[1:] + ids
        ]
        means.append(logprobs[-len(ids) :].mean().item())
    expected = math.exp(-np.mean(means))  # the empty text is left out
    assert perplexity(texts, prompts, random_gpt2_dir) == pytest.approx(expected, rel=1e-4)
    assert perplexity(["", " "], ["a", "b"], random_gpt2_dir) is None


def test_text_report_and_its_refusals(random_gpt2_dir):
    report = text_report(["a b", "a c", ""], ["p", "q", "r"], random_gpt2_dir)
    assert report["texts"] == 3 and report["empty_share"] == pytest.approx(1 / 3)
    assert report["mean_words"] == pytest.approx(4 / 3)
    assert report["distinct_1"] == pytest.approx(3 / 4) and report["perplexity"] > 1
    assert "perplexity" not in text_report(["a b"])
    with pytest.raises(ValueError, match="one per text"):
        text_report(["a"], None, random_gpt2_dir)
    with pytest.raises(ValueError, match="at least one text"):
        text_report([])


def test_evaluations_hand_over_the_texts_single_and_batched_alike():
    policy = lambda obs, mask: 5  # noqa: E731
    single = evaluate_policy(gym.make("textenvs/Summarize-v0", split="test"), policy, max_samples=6)
    envs = gym.make_vec("textenvs/Summarize-v0", num_envs=4, split="test")
    batched = evaluate_policy_batched(envs, policy, max_samples=6)
    assert len(single["texts"]) == 6 and single["texts"] == batched["texts"]
    assert single["prompts"] == batched["prompts"]
    env = gym.make("textenvs/Summarize-v0", split="test")
    for index in (0, 5):
        _, info = env.reset(options={"index": index})
        assert single["prompts"][index] == info["prompt"]
    stats = with_text_stats(dict(single))
    assert "texts" not in stats and stats["text_stats"]["texts"] == 6
