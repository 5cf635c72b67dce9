"""TextGenerationEnv: incremental = recompute, rewards = the metric libraries, bad input."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

import textenvs
from textenvs.envs.generate import TextGenerationEnv
from textenvs.tasks import Sample


def full_recompute(env: TextGenerationEnv) -> torch.Tensor:
    """Hidden states of prompt + generated tokens from one fresh forward, no cache reuse."""
    _, hidden, _ = env.lm.prefill(list(env.sequence.ids))
    return hidden


@pytest.mark.parametrize("obs_mode", ["last", "mean"])
@pytest.mark.parametrize("layer", [-1, 1])
def test_incremental_observation_equals_full_recompute(obs_mode, layer):
    env = TextGenerationEnv(task="summarize", obs=obs_mode, layer=layer, max_steps=20)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(12):
        obs, *_ = env.step(int(rng.integers(1, env.action_space.n)))
        hidden = full_recompute(env)
        expected = hidden[-1] if obs_mode == "last" else hidden.mean(0)
        np.testing.assert_allclose(obs, expected.numpy(), atol=1e-4)


def test_each_step_is_one_single_token_forward(monkeypatch):
    env = TextGenerationEnv(task="translate", max_steps=10)
    env.reset(seed=0)
    calls = []
    original = env.lm.model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(env.lm.model, "forward", spy)
    for _ in range(5):
        env.step(5)
    assert calls == [torch.Size([1, 1])] * 5  # one forward of ONE new token per step


def test_topk_action_zero_is_greedy_decoding():
    env = TextGenerationEnv(task="summarize", token_mode="topk", k=4, max_steps=24)
    _, info = env.reset(options={"index": 0})
    terminated = truncated = False
    while not (terminated or truncated):
        _, _, terminated, truncated, info = env.step(0)
    prompt_ids = env.lm.encode(env.prompt)
    assert info["text"] == env.lm.greedy(prompt_ids, max_new_tokens=24)
    assert env.action_space == gym.spaces.Discrete(4)


def test_topk_candidates_are_the_most_likely_tokens():
    env = TextGenerationEnv(task="summarize", token_mode="topk", k=8)
    env.reset(seed=1)
    probs = torch.softmax(env.logits, -1)
    cand = env.candidates
    assert list(probs[cand].numpy()) == sorted(probs[cand].numpy(), reverse=True)
    assert probs[cand[-1]] >= probs.topk(9).values[-1]


def rouge_l(hyp: str, ref: str) -> float:
    return rouge_scorer.RougeScorer(["rougeL"]).score(ref, hyp)["rougeL"].fmeasure


@pytest.mark.parametrize(
    "env_id,metric", [("textenvs/Summarize-v0", "rougeL"), ("textenvs/Translate-v0", "bleu")]
)
def test_dense_rewards_equal_library_deltas_and_sum_to_final_metric(env_id, metric):
    env = gym.make(env_id, token_mode="topk", k=3, max_steps=16).unwrapped
    _, info = env.reset(seed=11)
    ref = info["reference"]
    rng = np.random.default_rng(1)
    rewards, previous = [], 0.0
    done = False
    while not done:
        _, reward, terminated, truncated, info = env.step(int(rng.integers(3)))
        done = terminated or truncated
        if metric == "rougeL":
            value = rouge_l(info["text"], ref)
        else:
            value = BLEU(effective_order=True).sentence_score(info["text"], [ref]).score / 100
        assert reward == pytest.approx(value - previous, abs=1e-12)
        assert info["metric"] == pytest.approx(value, abs=1e-12)
        previous = value
        rewards.append(reward)
    assert sum(rewards) == pytest.approx(info["metric"], abs=1e-9)


def test_terminal_mode_pays_once_at_the_end():
    env = TextGenerationEnv(task="summarize", dense=False, token_mode="topk", k=2, max_steps=8)
    env.reset(seed=2)
    rewards, has_metrics, done = [], [], False
    while not done:
        _, r, terminated, truncated, info = env.step(0)
        rewards.append(r)
        has_metrics.append("metric" in info)
        done = terminated or truncated
    assert all(r == 0.0 for r in rewards[:-1])
    assert rewards[-1] == pytest.approx(rouge_l(info["text"], info["reference"]))
    # The metric is computed only when the episode ends.
    assert has_metrics == [False] * (len(rewards) - 1) + [True]
    assert info["metric"] == rewards[-1]


def test_terminates_at_max_steps():
    env = gym.make("textenvs/Summarize-v0", max_steps=3)
    env.reset(seed=0)
    eos = env.unwrapped.lm.eos_token_id
    token = 1 if eos != 1 else 2
    out = [env.step(token) for _ in range(3)]
    assert [o[2] for o in out] == [False, False, True] and not any(o[3] for o in out)
    assert out[-1][4]["tokens"] == 3 and out[-1][4]["stop"] == "max_steps"


def test_eos_terminates():
    env = TextGenerationEnv(task="summarize")
    env.reset(seed=0)
    _, _, terminated, truncated, info = env.step(env.lm.eos_token_id)
    assert terminated and not truncated and info["text"] == "" and info["stop"] == "eos"


def test_info_and_render():
    env = gym.make("textenvs/Translate-v0", render_mode="ansi", token_mode="topk")
    _, info = env.reset(seed=0)
    assert info["prompt"].startswith("English: ") and info["reference"] and info["text"] == ""
    env.step(0)
    assert env.render().startswith(info["prompt"])


def test_user_callable_reward_and_guardrails():
    env = TextGenerationEnv(
        task="summarize",
        reward=lambda hyp, refs: float(len(hyp.split())),
        repetition_penalty=0.5,
        token_mode="topk",
    )
    env.reset(seed=0)
    _, r, *_, info = env.step(0)
    assert "repeated_ngrams" in info and math.isfinite(r)


def test_nan_metric_raises_instead_of_leaving_the_env():
    env = TextGenerationEnv(task="summarize", reward=lambda hyp, refs: float("nan"))
    with pytest.raises(ValueError, match="finite"):
        env.reset(seed=0)


def test_generate_with_a_jsonl_dataset_and_a_saved_model(tmp_path, random_gpt2_dir):
    path = tmp_path / "data.jsonl"
    rows = [
        {"source": "Grüße aus Köln — 東京", "references": ["hello", "hi there"]},
        {"source": "b", "references": "c"},
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    env = gym.make(
        "textenvs/Generate-v0",
        model=random_gpt2_dir,
        dataset=str(path),
        reward="chrf",
        dataset_kwargs={"prompt_template": "Say: {source} ->"},
    )
    _, info = env.reset(options={"index": 0})
    assert (
        info["reference"] == "hello"
        and env.unwrapped.sample.references == ("hello", "hi there")
        and info["prompt"] == "Say: Grüße aus Köln — 東京 ->"
    )
    _, r, *_ = env.step(7)
    assert math.isfinite(r)


def test_translate_with_saved_model_and_bleu(random_gpt2_dir):
    env = gym.make("textenvs/Translate-v0", model=random_gpt2_dir, reward="bleu")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (32,)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"reward": "meteor"}, "Unknown reward 'meteor'"),
        ({"model": "./no/such/model"}, "not a folder here"),
        ({"obs": "first"}, "obs='first' is not valid"),
        ({"token_mode": "beam"}, "token_mode='beam'"),
        ({"token_mode": "topk", "k": 0}, "k must be"),
        ({"max_steps": 0}, "max_steps"),
        ({"split": "dev"}, "no split 'dev'"),
        ({"task": "qa"}, "Unknown built-in task 'qa'"),
        ({"layer": 99}, "layer=99 is out of range"),
        ({"dataset": "data.parquet"}, "Cannot load dataset"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        TextGenerationEnv(**kwargs)


def test_prompt_longer_than_context_is_refused_at_construction():
    long_source = " ".join(["word"] * 2000)
    with pytest.raises(
        ValueError, match=r"1 of the 1 samples of split 'train' \(samples 0; .* do not fit"
    ):
        TextGenerationEnv(dataset=[Sample(long_source, ("ref",))])


def test_reset_index_out_of_range():
    env = TextGenerationEnv(task="summarize", split="test")
    with pytest.raises(ValueError, match="out of range"):
        env.reset(options={"index": 10**6})


def test_envs_share_one_model_copy():
    a, b = gym.make("textenvs/Summarize-v0"), gym.make("textenvs/Translate-v0")
    assert a.unwrapped.lm is b.unwrapped.lm
    assert textenvs.ENV_IDS[:3] == [
        "textenvs/Generate-v0",
        "textenvs/Summarize-v0",
        "textenvs/Translate-v0",
    ]


@pytest.mark.parametrize("token_mode", ["topk", "vocab"])
def test_candidates_obs_carries_what_the_actions_stand_for(token_mode):
    import torch

    env = TextGenerationEnv(
        task="summarize", token_mode=token_mode, k=5, max_steps=4, candidates_obs=True
    )
    plain = TextGenerationEnv(task="summarize", token_mode=token_mode, k=5, max_steps=4)
    obs, _ = env.reset(seed=1)
    base, _ = plain.reset(seed=1)
    d = env.lm.hidden_size
    for _ in range(3):
        assert env.observation_space.contains(obs)
        np.testing.assert_array_equal(obs[:d], base)  # the hidden state comes first, unchanged
        logprobs = torch.log_softmax(env.logits.float(), -1)
        if token_mode == "topk":
            ids = torch.as_tensor(env.candidates)
            np.testing.assert_allclose(obs[-5:], logprobs[ids].numpy(), atol=1e-6)
            per = obs[d:-5].reshape(5, 10)
            np.testing.assert_allclose(per[:, :8], env.lm.token_features(ids).numpy(), atol=1e-6)
            prompt = env.sequence.ids[: len(env.sequence) - len(env.generated)]
            np.testing.assert_array_equal(per[:, 8], [float(t in prompt) for t in env.candidates])
            np.testing.assert_array_equal(
                per[:, 9], [float(t in env.generated) for t in env.candidates]
            )
            assert obs.shape == (d + 11 * 5,)
        else:
            np.testing.assert_allclose(obs[d:], logprobs.numpy(), atol=1e-6)
        n = env.action_space.n
        np.testing.assert_array_equal(env.action_logprobs(), obs[-n:])  # what agents read
        obs, *_ = env.step(1)
        base, *_ = plain.step(1)
    if token_mode == "topk":  # the flags take both values on this sample (the test can fail)
        assert set(per[:, 8]) | set(per[:, 9]) >= {0.0, 1.0}
    with pytest.raises(ValueError, match="candidates_obs must be True or False"):
        TextGenerationEnv(candidates_obs=1)


@pytest.mark.parametrize("token_mode", ["topk", "vocab"])
@pytest.mark.parametrize("layer", [-2, -1])
def test_context_observation_holds_every_position_of_a_full_recompute(token_mode, layer):
    """obs="context": the observed layer's state of every position (the env's own forwards, equal
    to one fresh forward over prompt + text), zeros after the last, the count, the candidates."""
    env = TextGenerationEnv(
        task="translate",
        obs="context",
        layer=layer,
        token_mode=token_mode,
        k=4,
        max_steps=8,
        context_positions=40,
    )
    d, extra = env.lm.hidden_size, 4 if token_mode == "topk" else 0
    assert env.observation_space.shape == (40 * d + 1 + extra,)
    obs, _ = env.reset(seed=2)
    rng = np.random.default_rng(0)
    for step in range(6):
        if step:
            obs, *_ = env.step(int(rng.integers(env.action_space.n)))
        n = len(env.sequence)
        context = obs[: 40 * d].reshape(40, d)
        np.testing.assert_allclose(context[:n], full_recompute(env).numpy(), atol=1e-4)
        assert not context[n:].any() and obs[40 * d] == n
        if token_mode == "topk":
            np.testing.assert_array_equal(obs[40 * d + 1 :], env.candidates)
    with_candidates = TextGenerationEnv(
        task="translate",
        obs="context",
        token_mode=token_mode,
        k=4,
        max_steps=8,
        candidates_obs=True,
        context_positions=40,
    )
    full, _ = with_candidates.reset(seed=2)
    n = with_candidates.action_space.n
    np.testing.assert_array_equal(full[-n:], with_candidates.action_logprobs())


def test_context_positions_is_checked_against_the_model_and_the_split():
    with pytest.raises(ValueError, match="applies to obs='context' only"):
        TextGenerationEnv(task="translate", context_positions=64)
    with pytest.raises(ValueError, match="more than the context of model"):
        TextGenerationEnv(task="translate", obs="context", context_positions=10**6)
    with pytest.raises(ValueError, match="context_positions must be an int >= 1"):
        TextGenerationEnv(task="translate", obs="context", context_positions=0)
    with pytest.raises(ValueError, match="do not fit the observed context_positions=20"):
        TextGenerationEnv(task="translate", obs="context", context_positions=20, max_steps=8)
    with pytest.warns(UserWarning, match="skipped"):
        env = TextGenerationEnv(
            task="translate", obs="context", context_positions=24, max_steps=8, too_long="skip"
        )
    assert 0 < len(env.samples) < len(env.task.split("train"))
    counted = [len(env.lm.encode(env.task.prompt(sample))) for sample in env.samples]
    np.testing.assert_array_equal(env.prompt_lengths(), counted)  # the samples it plays only
    assert env.prompt_lengths().max() + 8 <= 24
    env.reset(seed=0)
    assert len(env.sequence) <= 24 - 8
    default = TextGenerationEnv(task="translate", obs="context", max_steps=4)
    assert default.context_positions == default.lm.max_positions
