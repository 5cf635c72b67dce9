"""reward="lm_score": a causal LM's exp(mean token log-probability) of the text, batched."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from textenvs.model_rewards import LMScoreMetric

TEXTS = ["The town opens a new bridge.", "a", "Council delays the vote on the river plan again."]
PROMPTS = [
    "Article: the council met.\nHeadline:",
    "Article: x\nHeadline:",
    "Article: y.\nHeadline:",
]


def by_hand(folder: str, text: str, prompt: str | None) -> float:
    """The mean log-probability of the text's tokens, computed directly with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else [bos]
    full = torch.tensor([context + ids])
    with torch.no_grad():
        logprobs = model(full).logits[0].log_softmax(-1)
    return float(np.mean([logprobs[len(context) + i - 1, t].item() for i, t in enumerate(ids)]))


@pytest.mark.parametrize("conditioned", [False, True])
def test_lm_score_equals_the_log_probabilities_computed_directly(random_gpt2_dir, conditioned):
    metric = LMScoreMetric(
        random_gpt2_dir, input="prompt+text" if conditioned else "text", output="logprob"
    )
    batched = metric.score_batch(TEXTS, [()] * 3, PROMPTS)
    single = [metric.score_batch([t], [()], [p])[0] for t, p in zip(TEXTS, PROMPTS)]
    want = [by_hand(random_gpt2_dir, t, p if conditioned else None) for t, p in zip(TEXTS, PROMPTS)]
    assert batched == pytest.approx(want, abs=1e-5)
    assert batched == pytest.approx(single, abs=1e-5)  # padding changes nothing
    probability = LMScoreMetric(random_gpt2_dir, input=metric.INPUTS[conditioned])
    values = probability.score_batch(TEXTS, [()] * 3, PROMPTS)
    assert values == pytest.approx([math.exp(v) for v in want], rel=1e-4)
    assert all(0 < v <= 1 for v in values)


def test_an_env_scores_with_a_frozen_copy_of_its_own_model_by_default(random_gpt2_dir):
    env = gym.make("textenvs/Summarize-v0", model=random_gpt2_dir, reward="lm_score", max_steps=4)
    env.reset(seed=0)
    metric = env.unwrapped.shaper.metric
    assert isinstance(metric, LMScoreMetric) and metric.lm.model is not env.unwrapped.lm.model
    for _ in range(4):
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        if terminated or truncated:
            break
    assert info["metric_name"] == "lm_score" and 0.0 <= info["metric"] <= 1.0
    assert math.isfinite(reward)


def test_one_score_per_vector_step_for_every_sub_env(random_gpt2_dir, monkeypatch):
    calls = []
    score_batch = LMScoreMetric.score_batch

    def counted(self, texts, references, prompts):
        calls.append(len(texts))
        return score_batch(self, texts, references, prompts)

    monkeypatch.setattr(LMScoreMetric, "score_batch", counted)
    envs = gym.make_vec(
        "textenvs/Summarize-v0",
        num_envs=3,
        model=random_gpt2_dir,
        reward="lm_score",
        dense=True,
        max_steps=3,
    )
    envs.reset(seed=0)
    for _ in range(3):
        before = len(calls)
        envs.step(np.array([5, 6, 7]))
        assert len(calls) - before <= 1, "more than one LM-score forward in a vector step"
    assert sum(calls) >= 3
    envs.close()


def test_bad_lm_score_settings_are_refused(random_gpt2_dir):
    with pytest.raises(ValueError, match="output='ppl' is not valid"):
        LMScoreMetric(random_gpt2_dir, output="ppl")
    with pytest.raises(ValueError, match="needs reward_kwargs"):
        LMScoreMetric(None)


def test_lm_score_in_a_weighted_sum_defaults_to_the_envs_model(random_gpt2_dir):
    env = gym.make(
        "textenvs/Summarize-v0",
        model=random_gpt2_dir,
        reward={"lm_score": 0.5, "rougeL": 0.5},
        max_steps=3,
        dense=True,
    )
    env.reset(seed=0)
    _, _, _, _, info = env.step(5)
    parts = info["metric_lm_score"], info["metric_rougeL"]
    assert info["metric"] == pytest.approx(0.5 * parts[0] + 0.5 * parts[1])
    assert 0.0 < parts[0] <= 1.0
