"""Checks every registered id must pass: Gymnasium's and SB3's env checkers, same-seed determinism,
the reset/step contract."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env as gym_check_env

from tests.conftest import ENV_IDS, FAST_KWARGS


def make(env_id: str, **kwargs):
    return gym.make(env_id, **{**FAST_KWARGS[env_id], **kwargs})


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_gymnasium_check_env(env_id):
    gym_check_env(make(env_id).unwrapped, skip_render_check=True)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sb3_check_env(env_id):
    from stable_baselines3.common.env_checker import check_env

    check_env(make(env_id).unwrapped, warn=False)


def rollout(env, seed: int, n_steps: int):
    obs, info = env.reset(seed=seed)
    action_rng = np.random.default_rng(123)
    trace = [(obs, 0.0, info["text"])]
    for _ in range(n_steps):
        action = (
            int(action_rng.integers(env.action_space.n))
            if isinstance(env.action_space, gym.spaces.Discrete)
            else action_rng.integers(env.action_space.nvec)
        )
        obs, reward, terminated, truncated, info = env.step(action)
        trace.append((obs, reward, info["text"]))
        if terminated or truncated:
            obs, info = env.reset()
            trace.append((obs, 0.0, info["text"]))
    return trace


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_same_seed_same_trajectory(env_id):
    a = rollout(make(env_id), seed=7, n_steps=15)
    b = rollout(make(env_id), seed=7, n_steps=15)
    assert len(a) == len(b)
    for (obs_a, r_a, t_a), (obs_b, r_b, t_b) in zip(a, b, strict=False):
        np.testing.assert_array_equal(obs_a, obs_b)
        assert r_a == r_b and t_a == t_b


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_step_before_reset_raises(env_id):
    env = make(env_id)
    with pytest.raises(ResetNeeded, match="reset"):
        env.unwrapped.step(env.action_space.sample())


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("bad", [-1, 10**9, 1.5, "a", None])
def test_action_outside_space_raises(env_id, bad):
    env = make(env_id)
    env.reset(seed=0)
    if isinstance(env.action_space, gym.spaces.MultiDiscrete):
        bad = [bad] * len(env.action_space.nvec)
    with pytest.raises(ValueError, match="not in the action space"):
        env.unwrapped.step(bad)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_step_after_end_raises(env_id):
    env = make(env_id).unwrapped
    env.reset(seed=0)
    for _ in range(1000):
        _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert np.isfinite(reward)
        if terminated or truncated:
            break
    with pytest.raises(ResetNeeded, match="reset"):
        env.step(env.action_space.sample())


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_is_edit_env_follows_the_entry_point(env_id):
    import textenvs
    from textenvs.envs.edit import TextEditEnv

    assert textenvs.is_edit_env(env_id) == isinstance(
        gym.make(env_id, **FAST_KWARGS[env_id]).unwrapped, TextEditEnv
    )
