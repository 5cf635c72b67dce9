"""Batched vector envs: equivalence to single envs, autoreset, bad input, SB3 adapter, async and
pickling.
"""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from tests.conftest import ENV_IDS, FAST_KWARGS
from textenvs.vector import EditVectorEnv, GenerationVectorEnv, as_sb3_vec_env, batch_infos


def gen_actions(rng, n, eos):
    # Random tokens, EOS now and then, so the sub-envs' episodes end at different steps.
    a = rng.integers(0, 1024, size=n)
    a[rng.random(n) < 0.15] = eos
    return a


def assert_infos_equal(a, b):
    assert list(a) == list(b)
    for key in a:
        if isinstance(a[key], dict):
            assert_infos_equal(a[key], b[key])
        else:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            for x, y in zip(a[key], b[key]):
                assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, key


def test_batch_infos_matches_gymnasiums_add_info():
    # Every kind of value gymnasium distinguishes: Python and NumPy scalars, arrays, objects,
    # nested dicts, final_obs, and keys that only some sub-envs report.
    rng = np.random.default_rng(0)
    items = []
    for i in [0, 2, 3, 5]:
        info = {
            "text": f"t{i}",
            "tokens": i,
            "score": float(i) / 3,
            "done": bool(i % 2),
            "f32": np.float32(i),
            "vec": rng.normal(size=3).astype(np.float32),
            "metrics": {"rougeL": i / 7, "nested": {"n": i}},
            "final_obs": rng.normal(size=2),
        }
        if i > 2:
            info["late"] = [i]
            info["final_info"] = {"text": "end", "metrics": {"rougeL": 0.5}}
        items.append((i, info))
    reference: dict = {}
    adder = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 6)
    for i, info in items:
        reference = adder._add_info(reference, info, i)
    assert_infos_equal(batch_infos(6, items), reference)


@pytest.mark.parametrize(
    "num_envs,action_mode", [(1, "vocab"), (3, "vocab"), (8, "vocab"), (3, "topk")]
)
def test_generation_vector_equals_single_envs(num_envs, action_mode):
    kwargs = dict(task="translate", max_steps=6, token_mode=action_mode, k=8)
    envs = GenerationVectorEnv(num_envs, **kwargs)
    singles = [gym.make("textenvs/Generate-v0", **kwargs).unwrapped for _ in range(num_envs)]
    obs, infos = envs.reset(seed=10)
    single_obs = [env.reset(seed=10 + i)[0] for i, env in enumerate(singles)]
    np.testing.assert_allclose(obs, np.stack(single_obs), atol=1e-4)
    rng = np.random.default_rng(0)
    eos = envs.lm.eos_token_id
    ended = 0
    for _ in range(20):
        actions = (
            gen_actions(rng, num_envs, eos)
            if action_mode == "vocab"
            else rng.integers(0, 8, size=num_envs)
        )
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        for i, env in enumerate(singles):
            o, r, te, tr, info = env.step(int(actions[i]))
            assert (te, tr) == (terminated[i], truncated[i])
            assert r == rewards[i]
            if te or tr:
                ended += 1
                np.testing.assert_allclose(infos["final_obs"][i], o, atol=1e-4)
                assert infos["final_info"]["text"][i] == info["text"]
                o, info = env.reset()
            assert infos["text"][i] == info["text"] and infos["index"][i] == info["index"]
            np.testing.assert_allclose(obs[i], o, atol=1e-4)
            if action_mode == "topk":
                np.testing.assert_array_equal(envs.envs[i].candidates, env.candidates)
    assert ended >= num_envs  # episodes of mixed lengths did end and auto-reset


def test_edit_vector_equals_single_envs():
    kwargs = dict(task="summarize", max_len=16, max_steps=5, obs="positions")
    envs = EditVectorEnv(3, **kwargs)
    singles = [gym.make("textenvs/Edit-v0", **kwargs).unwrapped for _ in range(3)]
    obs, _ = envs.reset(seed=1)
    for i, env in enumerate(singles):
        np.testing.assert_allclose(obs[i], env.reset(seed=1 + i)[0], atol=1e-4)
    rng = np.random.default_rng(1)
    for _ in range(12):
        actions = rng.integers(envs.single_action_space.nvec, size=(3, 3))
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        for i, env in enumerate(singles):
            o, r, te, tr, info = env.step(actions[i])
            assert r == pytest.approx(rewards[i]) and (te, tr) == (terminated[i], truncated[i])
            if te or tr:
                o, info = env.reset()
            assert infos["text"][i] == info["text"]
            np.testing.assert_allclose(obs[i], o, atol=1e-4)
    assert envs.action_masks().shape == (3, 4 + 17 + 8)


@pytest.mark.parametrize("bad", [[0, 0, 8], [0, -1, 0], [4, 0, 0]])
def test_edit_vector_rejects_an_edit_outside_the_space(bad):
    kwargs = dict(task="summarize", max_len=16, max_steps=5)
    envs = EditVectorEnv(3, **kwargs)
    envs.reset(seed=1)
    texts = [env.text for env in envs.envs]
    actions = np.zeros((3, 3), dtype=np.int64)
    actions[1] = bad  # nvec is (4, max_len + 1, k = 8)
    with pytest.raises(ValueError, match="sub-env 1 is not in the action space"):
        envs.step(actions)
    assert [env.text for env in envs.envs] == texts  # no sub-env was stepped


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_make_vec_uses_the_batched_env(env_id):
    envs = gym.make_vec(env_id, num_envs=2, **FAST_KWARGS[env_id])
    assert isinstance(envs.unwrapped, (GenerationVectorEnv, EditVectorEnv))
    obs, _ = envs.reset(seed=0)
    assert envs.observation_space.contains(obs)
    obs, *_ = envs.step(envs.action_space.sample())
    assert envs.observation_space.contains(obs)


def test_next_step_autoreset():
    envs = GenerationVectorEnv(2, task="summarize", max_steps=2, autoreset_mode="NextStep")
    envs.reset(seed=0)
    envs.step(np.array([5, 5]))
    obs, rewards, terminated, truncated, infos = envs.step(np.array([5, 5]))
    assert terminated.all() and "final_obs" not in infos
    obs, rewards, terminated, truncated, infos = envs.step(np.array([5, 5]))  # the reset step
    assert (rewards == 0).all() and not terminated.any() and (infos["text"] == "").all()
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP


def test_sync_mode_still_works():
    envs = gym.make_vec("textenvs/Summarize-v0", num_envs=2, vectorization_mode="sync", max_steps=3)
    envs.reset(seed=0)
    envs.step(envs.action_space.sample())


@pytest.mark.parametrize(
    "actions,match",
    [
        (np.array([1, 2]), r"shape \(3,\)"),
        (np.array([1.0, 2.0, 3.0]), "integer action array"),
        (np.array([1, 2, 10**6]), "sub-env 2 is not in the action space"),
    ],
)
def test_bad_action_batches_raise_and_corrupt_nothing(actions, match):
    envs = GenerationVectorEnv(3, task="summarize")
    reference = GenerationVectorEnv(3, task="summarize")
    envs.reset(seed=0)
    reference.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        envs.step(actions)
    a, b = envs.step(np.array([7, 8, 9])), reference.step(np.array([7, 8, 9]))
    np.testing.assert_array_equal(a[0], b[0])
    assert list(a[4]["text"]) == list(b[4]["text"])


def test_step_before_reset():
    with pytest.raises(gym.error.ResetNeeded):
        GenerationVectorEnv(2).step(np.array([1, 2]))


def test_finished_caches_are_dropped():
    envs = GenerationVectorEnv(4, task="summarize", max_steps=4)
    envs.reset(seed=0)
    longest = 0
    for _ in range(400):
        envs.step(np.full(4, 9))
        longest = max(longest, max(len(env.sequence) for env in envs.envs))
        # Freed slots are reclaimed: the batch never holds more than the longest row plus the slack.
        assert envs.batch.slots <= longest + envs.batch.slack + 1
    assert all(env.sequence.cache is None for env in envs.envs)  # each row lives in the batch only
    edit = EditVectorEnv(3, task="summarize", max_len=12, max_steps=3)
    edit.reset(seed=0)
    for _ in range(30):
        edit.step(edit.action_space.sample())
    for env in edit.envs:
        assert (
            env.sequence.cache.layers[0].keys.shape[2] == len(env.sequence) <= env._prompt_len + 12
        )


def test_lockstep_batch_compaction_keeps_results():
    envs = GenerationVectorEnv(3, task="translate", max_steps=3)
    envs.batch.slack = 0  # compact after every reset
    single = [gym.make("textenvs/Translate-v0", max_steps=3).unwrapped for _ in range(3)]
    obs, _ = envs.reset(seed=5)
    for i, env in enumerate(single):
        env.reset(seed=5 + i)
    for step in range(10):
        obs, *_ = envs.step(np.full(3, 20 + step))
        for i, env in enumerate(single):
            o, _, te, tr, _ = env.step(20 + step)
            if te or tr:
                o, _ = env.reset()
            np.testing.assert_allclose(obs[i], o, atol=1e-4)


def test_sb3_adapter_runs_ppo():
    pytest.importorskip("stable_baselines3")
    from stable_baselines3 import PPO

    venv = as_sb3_vec_env(
        gym.make_vec("textenvs/Summarize-v0", num_envs=4, token_mode="topk", k=4, max_steps=4)
    )
    model = PPO("MlpPolicy", venv, n_steps=8, batch_size=16, n_epochs=1, seed=0)
    model.learn(64)
    obs = venv.reset()
    assert obs.shape == (4, 128)
    _, _, dones, infos = venv.step(np.zeros(4, dtype=np.int64))
    assert len(infos) == 4 and "TimeLimit.truncated" in infos[0]


def test_sb3_adapter_gives_terminal_observation():
    venv = as_sb3_vec_env(GenerationVectorEnv(2, task="summarize", max_steps=2))
    venv.reset()
    venv.step(np.array([5, 5]))
    _, _, dones, infos = venv.step(np.array([5, 5]))
    assert (
        dones.all()
        and infos[0]["terminal_observation"].shape == (128,)
        and not infos[0]["TimeLimit.truncated"]
    )


def test_sb3_adapter_refuses_next_step_mode():
    with pytest.raises(ValueError, match="SameStep"):
        as_sb3_vec_env(GenerationVectorEnv(2, autoreset_mode="NextStep"))


def test_maskable_ppo_on_batched_edit_env():
    pytest.importorskip("sb3_contrib")
    from sb3_contrib import MaskablePPO

    venv = as_sb3_vec_env(
        gym.make_vec("textenvs/EditSummary-v0", num_envs=2, max_len=8, max_steps=4, k=2)
    )
    MaskablePPO("MlpPolicy", venv, n_steps=8, batch_size=8, n_epochs=1, seed=0).learn(16)


def test_env_pickles_mid_episode():
    env = gym.make("textenvs/Summarize-v0").unwrapped
    env.reset(seed=3)
    env.step(11)
    clone = pickle.loads(pickle.dumps(env))
    assert clone.lm is env.lm  # by reference: no second copy of the weights
    a, b = env.step(12), clone.step(12)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1:4] == b[1:4] and a[4]["text"] == b[4]["text"]


@pytest.mark.slow
def test_async_mode():
    # "spawn": a forked worker of a process whose torch thread pool already ran can deadlock.
    envs = gym.make_vec(
        "textenvs/Translate-v0",
        num_envs=2,
        vectorization_mode="async",
        max_steps=3,
        vector_kwargs={"context": "spawn"},
    )
    try:
        obs, _ = envs.reset(seed=0)
        assert obs.shape == (2, 128)
        envs.step(envs.action_space.sample())
    finally:
        envs.close()
