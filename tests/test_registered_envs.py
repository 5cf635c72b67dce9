"""Checks every registered id must pass: Gymnasium's and SB3's env checkers, same-seed determinism,
the reset/step contract."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env as gym_check_env

import textenvs
from tests.conftest import BENCHMARK_KWARGS, ENV_IDS, FAST_KWARGS


def make(env_id: str, **kwargs):
    return gym.make(env_id, **{**FAST_KWARGS[env_id], **kwargs})


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_gymnasium_check_env(env_id):
    gym_check_env(make(env_id).unwrapped, skip_render_check=True)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sb3_check_env(env_id):
    from stable_baselines3.common.env_checker import check_env

    check_env(make(env_id).unwrapped, warn=False)


@pytest.mark.parametrize("env_id", [i for i in ENV_IDS if textenvs.is_edit_env(i)])
@pytest.mark.parametrize("text_infos", [True, False])
def test_both_checkers_pass_with_flat_actions_and_numeric_infos(env_id, text_infos):
    from stable_baselines3.common.env_checker import check_env

    env = make(env_id, flat_actions=True, text_infos=text_infos).unwrapped
    gym_check_env(env, skip_render_check=True)
    check_env(env, warn=False)


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


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("dense", [True, False])
def test_info_carries_the_task_metric_under_one_key(env_id, dense):
    """The env -> agent contract: info["metric"] / info["metric_name"] wherever it was computed."""
    env = make(env_id, dense=dense)
    _, info = env.reset(seed=0)
    name = env.unwrapped.shaper.name
    infos = [info]
    for _ in range(100):
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        infos.append(info)
        if terminated or truncated:
            break
    assert terminated or truncated
    last = infos[-1]
    assert last["metric_name"] == name and isinstance(last["score"], float)
    assert np.isfinite(last["metric"]) and isinstance(last["metric"], float)
    for info in infos:
        assert {"prompt", "text", "reference", "index"} <= set(info)
        if "metric" in info:
            assert info["metric_name"] == name and isinstance(info["score"], float)
    if dense:
        assert all("metric" in info for info in infos)
    # Stackable by vectorising libraries: flat values of one type per key, reset included.
    types: dict[str, type] = {}
    for info in infos:
        for key, value in info.items():
            assert value is not None, key
            if isinstance(value, dict):
                assert all(type(v) is float for v in value.values()), (key, value)
            else:
                assert type(value) in (int, float, bool, str), (key, type(value))
            assert types.setdefault(key, type(value)) is type(value), key
    if dense:  # terminal mode adds the metric keys at the last step only
        assert all(set(info) == set(infos[-1]) for info in infos)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_both_env_kinds_share_the_knob_names(env_id):
    data = BENCHMARK_KWARGS.get(env_id, {})  # a benchmark id's fixture and stand-in model
    env = gym.make(env_id, token_mode="topk", k=3, max_steps=2, **data).unwrapped
    assert (env.token_mode, env.k, env.max_steps) == ("topk", 3, 2)
    if env_id in textenvs.DIALOGUE_IDS:  # new ids: no deprecated names
        with pytest.raises(ValueError, match="max_turn_tokens="):
            gym.make(env_id, max_new_tokens=2)
        return
    old = "max_edits" if textenvs.is_edit_env(env_id) else "max_new_tokens"
    with pytest.warns(DeprecationWarning, match=f"{old}= is deprecated"):
        aliased = gym.make(env_id, **{old: 2}, **data).unwrapped
    assert aliased.max_steps == 2
    with pytest.raises(ValueError, match="pass only max_steps"):
        gym.make(env_id, max_steps=5, **{old: 2}, **data)


def test_action_mode_is_a_deprecated_name_of_token_mode():
    with pytest.warns(DeprecationWarning, match="action_mode= is deprecated"):
        env = gym.make("textenvs/Summarize-v0", action_mode="topk", k=2).unwrapped
    assert env.token_mode == env.action_mode == "topk" and env.action_space.n == 2


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sb3_make_vec_env_works_on_every_id(env_id):
    # SB3's helper passes render_mode="rgb_array": the envs draw their text into an image.
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env(env_id, n_envs=2, env_kwargs=FAST_KWARGS[env_id])
    obs = venv.reset()
    assert obs.shape == (2, *venv.observation_space.shape)
    frame = venv.env_method("render", indices=[0])[0]
    assert frame.shape == (450, 800, 3) and frame.dtype == np.uint8 and (frame < 255).any()
    gym_check_env(make(env_id, render_mode="rgb_array").unwrapped)  # the render check included


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_infos_keep_their_keys_and_types_on_every_step(env_id):
    """No None for "not yet": a vectorising library can stack every step's info."""
    env = make(env_id)
    _, first = env.reset(seed=0)
    kinds = None
    for _ in range(30):
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        assert all(v is not None for v in info.values()), info
        step_kinds = {
            # the metric keys come whenever the metric is computed (only at the end for a
            # terminal reward, the default of model-based metrics)
            k: type(v)
            for k, v in info.items()
            if k not in ("metric", "metric_name", "metrics", "score")
        }
        kinds = kinds or step_kinds
        assert step_kinds == kinds
        if terminated or truncated:
            env.reset()


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("token_mode", ["topk", "vocab"])
def test_both_checkers_pass_with_candidate_observations(env_id, token_mode):
    from stable_baselines3.common.env_checker import check_env

    if textenvs.is_edit_env(env_id) and token_mode == "vocab":  # no k choices to describe
        with pytest.raises(ValueError, match="use token_mode='topk'"):
            make(env_id, candidates_obs=True, token_mode=token_mode)
        return
    env = make(env_id, candidates_obs=True, token_mode=token_mode, k=4).unwrapped
    gym_check_env(env, skip_render_check=True)
    check_env(env, warn=False)


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("token_mode", ["topk", "vocab"])
def test_context_observations_pass_both_checkers_and_replay_by_seed(env_id, token_mode):
    """obs="context" (every position's state, the count, the candidates; with the candidate block)
    on every generation id: both checkers, and the same seed gives the same trajectory."""
    from stable_baselines3.common.env_checker import check_env

    kwargs = dict(obs="context", layer=-2, candidates_obs=True, token_mode=token_mode, k=4)
    if textenvs.is_edit_env(env_id):  # the edit envs observe positions of their own
        with pytest.raises(ValueError, match="obs="):
            make(env_id, **kwargs)
        return
    # a conversation's opening is longer than a built-in prompt
    kwargs["context_positions"] = 256 if env_id in textenvs.DIALOGUE_IDS else 96
    env = make(env_id, **kwargs).unwrapped
    gym_check_env(env, skip_render_check=True)
    check_env(env, warn=False)
    a = rollout(make(env_id, **kwargs), seed=5, n_steps=10)
    b = rollout(make(env_id, **kwargs), seed=5, n_steps=10)
    assert len(a) == len(b)
    for (obs_a, r_a, t_a), (obs_b, r_b, t_b) in zip(a, b, strict=True):
        np.testing.assert_array_equal(obs_a, obs_b)
        assert r_a == r_b and t_a == t_b
