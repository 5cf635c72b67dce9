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

# the tests of same-step semantics (final_obs / final_info); the default is NextStep, gymnasium's
SAME_STEP = {"autoreset_mode": "SameStep"}


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
    "num_envs,action_mode,obs",
    [
        (1, "vocab", "last"),
        (3, "vocab", "last"),
        (8, "vocab", "last"),
        (3, "topk", "last"),
        (3, "topk", "context"),
        (2, "vocab", "context"),
    ],
)
def test_generation_vector_equals_single_envs(num_envs, action_mode, obs):
    kwargs = dict(task="translate", max_steps=6, token_mode=action_mode, k=8, obs=obs)
    if obs == "context":  # every position's state: the batched prefill's rows, then each step's
        kwargs.update(layer=-2, candidates_obs=True, context_positions=48)
    envs = GenerationVectorEnv(num_envs, text_infos=True, **kwargs, **SAME_STEP)
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
    envs = EditVectorEnv(3, text_infos=True, **kwargs, **SAME_STEP)
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
    envs = EditVectorEnv(3, text_infos=True, **kwargs)
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
    envs = GenerationVectorEnv(
        2, text_infos=True, task="summarize", max_steps=2, autoreset_mode="NextStep"
    )
    envs.reset(seed=0)
    envs.step(np.array([5, 5]))
    obs, rewards, terminated, truncated, infos = envs.step(np.array([5, 5]))
    assert terminated.all() and "final_obs" not in infos
    obs, rewards, terminated, truncated, infos = envs.step(np.array([5, 5]))  # the reset step
    assert (rewards == 0).all() and not terminated.any() and (infos["text"] == "").all()
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP


def long_prompt_dataset(lm, max_steps: int):
    """Samples whose longest prompt plus ``max_steps`` fills the model's context exactly."""
    from textenvs.tasks import Sample, task_from_samples

    words, source = "the old farmer sees a red bird near the river".split(), ""
    while len(lm.encode(source + " word")) + max_steps <= lm.max_positions:
        source += " " + words[len(source.split()) % len(words)]
    budget = lm.max_positions - len(lm.encode(source.strip()))
    samples = [Sample(source.strip(), ("la kolo",)), Sample("A dog.", ("un vasko",))]
    return task_from_samples("long", samples, "{source}"), budget


@pytest.mark.parametrize(
    "case",
    [
        "generation-vocab",
        "generation-topk",
        "generation-context",
        "generation-fills-context",
        "edit",
    ],
)
def test_next_step_autoreset_equals_single_envs_over_whole_episodes(case):
    """NextStep: the step after an episode ends resets that sub-env (reward 0, its action ignored);
    every later episode equals a single env's, however episodes of mixed lengths interleave."""
    from textenvs.lm import shared_model

    if case == "edit":
        kwargs, n_steps = dict(task="summarize", max_len=12, max_steps=3, obs="positions"), 40
    elif case == "generation-fills-context":
        task, budget = long_prompt_dataset(shared_model(), 3)
        kwargs, n_steps = dict(task=task, max_steps=budget), 30
    elif case == "generation-context":
        kwargs = dict(task="translate", max_steps=4, token_mode="topk", k=6, obs="context")
        kwargs.update(layer=-2, candidates_obs=True, context_positions=32)
        n_steps = 60
    else:
        kwargs = dict(task="translate", max_steps=4, token_mode=case.split("-")[1], k=6)
        n_steps = 60
    cls = EditVectorEnv if case == "edit" else GenerationVectorEnv
    envs = cls(3, autoreset_mode="NextStep", text_infos=True, **kwargs)
    singles = [cls.env_class(**kwargs) for _ in range(3)]
    obs, _ = envs.reset(seed=4)
    for i, env in enumerate(singles):
        np.testing.assert_allclose(obs[i], env.reset(seed=4 + i)[0], atol=1e-4)
    rng = np.random.default_rng(2)
    waiting, episodes = [False] * 3, 0
    for _ in range(n_steps):
        if case == "edit":
            actions = rng.integers(envs.single_action_space.nvec, size=(3, 3))
        elif kwargs.get("token_mode") == "topk":
            actions = rng.integers(0, 6, size=3)
        else:
            actions = gen_actions(rng, 3, envs.lm.eos_token_id)
        obs, rewards, terminated, truncated, infos = envs.step(actions)
        for i, env in enumerate(singles):
            if waiting[i]:  # this step is the sub-env's reset
                o, info = env.reset()
                r, te, tr = 0.0, False, False
                waiting[i] = False
            else:
                action = actions[i] if case == "edit" else int(actions[i])
                o, r, te, tr, info = env.step(action)
                waiting[i] = te or tr
                episodes += te or tr
            assert (te, tr) == (terminated[i], truncated[i]) and r == pytest.approx(rewards[i])
            assert infos["text"][i] == info["text"] and infos["index"][i] == info["index"]
            np.testing.assert_allclose(obs[i], o, atol=1e-4)
    assert episodes >= 6  # many whole episodes ended and restarted in every sub-env


def test_sync_mode_equals_the_batched_env():
    kwargs = dict(max_steps=3)
    same_step = {"autoreset_mode": AutoresetMode.SAME_STEP}
    sync = gym.make_vec(
        "textenvs/Summarize-v0",
        num_envs=2,
        vectorization_mode="sync",
        vector_kwargs=same_step,
        **kwargs,
    )
    batched = gym.make_vec(
        "textenvs/Summarize-v0", num_envs=2, text_infos=True, **kwargs, **SAME_STEP
    )
    a, _ = sync.reset(seed=0)
    b, _ = batched.reset(seed=0)
    np.testing.assert_allclose(a, b, atol=1e-4)
    rng = np.random.default_rng(0)
    for _ in range(7):  # episodes end and auto-reset in the same step in both
        actions = gen_actions(rng, 2, batched.unwrapped.lm.eos_token_id)
        a, ra, ta, _, ia = sync.step(actions)
        b, rb, tb, _, ib = batched.step(actions)
        np.testing.assert_allclose(a, b, atol=1e-4)
        np.testing.assert_allclose(ra, rb, atol=1e-6)
        assert (ta == tb).all() and list(ia["text"]) == list(ib["text"])


def test_a_full_reset_replays_bit_for_bit_whatever_came_before():
    """reset(seed) of every sub-env starts afresh: the floats that follow do not depend on the
    history (what makes a resumed token-PPO run equal the uninterrupted one bit for bit)."""

    def run(envs, steps):
        obs, _ = envs.reset(seed=11)
        out = [obs]
        for t in range(steps):
            obs, reward, *_ = envs.step(np.full(3, 5 + t))
            out += [obs, reward]
        return out

    fresh = gym.make_vec("textenvs/Summarize-v0", num_envs=3, token_mode="vocab", max_steps=4)
    used = gym.make_vec("textenvs/Summarize-v0", num_envs=3, token_mode="vocab", max_steps=4)
    used.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(9):  # episodes end at different times, rows restart, the batch grows
        used.step(rng.integers(0, used.single_action_space.n, 3))
    for a, b in zip(run(fresh, 6), run(used, 6)):
        assert np.array_equal(a, b)


def test_reset_mask_resets_only_the_masked_sub_envs():
    envs = GenerationVectorEnv(3, text_infos=True, task="summarize", max_steps=8)
    with pytest.raises(ValueError, match="first reset"):
        envs.reset(seed=0, options={"reset_mask": np.array([True, False, True])})
    envs.reset(seed=0)
    envs.step(np.array([11, 12, 13]))
    texts = [env.text for env in envs.envs]
    with pytest.raises(ValueError, match="shape"):
        envs.reset(options={"reset_mask": np.array([True, False])})
    obs, infos = envs.reset(
        seed=[None, 7, None], options={"reset_mask": np.array([False, True, False])}
    )
    assert list(infos["_text"]) == [False, True, False]  # only sub-env 1 reports a reset info
    assert [envs.envs[0].text, envs.envs[2].text] == [
        texts[0],
        texts[2],
    ]  # the others keep their episode
    fresh = gym.make("textenvs/Summarize-v0", max_steps=8).unwrapped
    np.testing.assert_allclose(obs[1], fresh.reset(seed=7)[0], atol=1e-4)
    obs, *_ = envs.step(np.array([20, 21, 22]))  # every row steps on from where it is
    o, *_ = fresh.step(21)
    np.testing.assert_allclose(obs[1], o, atol=1e-4)
    assert envs.envs[0].generated[-2:] == [11, 20]


def test_edit_vector_final_obs_and_final_info_are_the_ended_episodes():
    kwargs = dict(task="summarize", max_len=12, max_steps=2, obs="positions")
    envs = EditVectorEnv(2, text_infos=True, **kwargs, **SAME_STEP)
    singles = [EditVectorEnv.env_class(**kwargs) for _ in range(2)]
    envs.reset(seed=3)
    for i, env in enumerate(singles):
        env.reset(seed=3 + i)
    rng = np.random.default_rng(3)
    ended = 0
    for _ in range(6):
        actions = rng.integers(envs.single_action_space.nvec, size=(2, 3))
        obs, _, terminated, truncated, infos = envs.step(actions)
        for i, env in enumerate(singles):
            o, _, te, tr, info = env.step(actions[i])
            if te or tr:
                ended += 1
                assert infos["_final_obs"][i] and infos["_final_info"][i]
                np.testing.assert_allclose(infos["final_obs"][i], o, atol=1e-4)
                assert infos["final_info"]["text"][i] == info["text"]
                assert infos["final_info"]["metric"][i] == pytest.approx(info["metric"])
                assert infos["final_info"]["edits"][i] == info["edits"]
                o, info = env.reset()
                assert (
                    infos["text"][i] == info["text"]
                )  # the returned obs is the new episode's first
            else:
                assert not infos.get("_final_obs", np.zeros(2, bool))[i]
            np.testing.assert_allclose(obs[i], o, atol=1e-4)
    assert ended >= 4


@pytest.mark.parametrize(
    "actions,match",
    [
        (np.array([1, 2]), r"shape \(3,\)"),
        (np.array([1.0, 2.0, 3.0]), "Actions must be integers, got dtype float64"),
        (np.array([1.0, np.nan, 3.0]), r"must be integers.*nan"),
        (np.array([1, 2, 10**6]), "sub-env 2 is not in the action space"),
    ],
)
def test_bad_action_batches_raise_and_corrupt_nothing(actions, match):
    envs = GenerationVectorEnv(3, text_infos=True, task="summarize")
    reference = GenerationVectorEnv(3, text_infos=True, task="summarize")
    envs.reset(seed=0)
    reference.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        envs.step(actions)
    a, b = envs.step(np.array([7, 8, 9])), reference.step(np.array([7, 8, 9]))
    np.testing.assert_array_equal(a[0], b[0])
    assert list(a[4]["text"]) == list(b[4]["text"])


@pytest.mark.parametrize("mode", ["NextStep", "SameStep", "Disabled"])
@pytest.mark.parametrize("bad", [-1, 10**6])
def test_an_action_outside_the_space_is_refused_on_the_autoreset_step_too(mode, bad):
    envs = GenerationVectorEnv(2, task="summarize", max_steps=1, autoreset_mode=mode)
    envs.reset(seed=0)
    envs.step(np.array([1, 2]))  # both end: the next step resets them (NextStep)
    if mode == "Disabled":
        envs.reset(options={"reset_mask": np.array([True, True])})
    with pytest.raises(ValueError, match="sub-env 1 is not in the action space"):
        envs.step(np.array([1, bad]))
    with pytest.raises(ValueError, match="sub-env 1 is not in the action space"):
        envs.step_unfinished(np.array([1, bad]))


def test_step_before_reset():
    with pytest.raises(gym.error.ResetNeeded):
        GenerationVectorEnv(2).step(np.array([1, 2]))


def test_finished_caches_are_dropped():
    envs = GenerationVectorEnv(4, text_infos=True, task="summarize", max_steps=4)
    envs.reset(seed=0)
    longest = 0
    for _ in range(400):
        envs.step(np.full(4, 9))
        longest = max(longest, max(len(env.sequence) for env in envs.envs))
        # Freed slots are reclaimed: the batch never holds more than the longest row plus the slack.
        assert envs.batch.slots <= longest + envs.batch.slack + 1
    assert all(env.sequence.cache is None for env in envs.envs)  # each row lives in the batch only
    edit = EditVectorEnv(3, text_infos=True, task="summarize", max_len=12, max_steps=3)
    edit.reset(seed=0)
    for _ in range(30):
        edit.step(edit.action_space.sample())
    for env in edit.envs:
        assert (
            env.sequence.cache.layers[0].keys.shape[2] == len(env.sequence) <= env._prompt_len + 12
        )


def test_lockstep_batch_compaction_keeps_results():
    envs = GenerationVectorEnv(3, text_infos=True, task="translate", max_steps=3, **SAME_STEP)
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


def test_sb3_adapter_truncation_path():
    # An edit env truncates itself at max_steps: SB3 must see done, TimeLimit.truncated (so it
    # bootstraps from the terminal observation), the ended episode's info and the new episode's
    # reset info.
    envs = EditVectorEnv(2, text_infos=True, task="summarize", max_len=10, max_steps=2)
    venv = as_sb3_vec_env(envs)
    venv.reset()
    replace_first = np.array(
        [[2, 0, 0], [2, 0, 1]]
    )  # a valid replace in both (drafts are non-empty)
    _, _, dones, infos = venv.step(replace_first)
    assert not dones.any() and not infos[0]["TimeLimit.truncated"]
    _, _, dones, infos = venv.step(replace_first)
    assert dones.all()
    for i, info in enumerate(infos):
        assert info["TimeLimit.truncated"] and info["edits"] == 2  # the ended episode's info
        assert info["terminal_observation"].shape == envs.single_observation_space.shape
        assert venv.reset_infos[i]["edits"] == 0  # the new episode's reset info
    stop = np.array([[3, 0, 0], [3, 0, 0]])
    _, _, dones, infos = venv.step(stop)  # stop terminates: not a truncation
    assert dones.all() and not any(info["TimeLimit.truncated"] for info in infos)


def _sb3_trajectory(venv, steps: int, seed: int = 0) -> list:
    venv.seed(seed)
    out = [venv.reset()]
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        actions = rng.integers(3, 40, size=venv.num_envs)
        obs, rewards, dones, infos = venv.step(actions)
        ends = [
            (info["terminal_observation"], info["metric"], info["TimeLimit.truncated"])
            for info in infos
            if "terminal_observation" in info
        ]
        out.append((obs, rewards, dones, ends, [dict(info) for info in venv.reset_infos]))
    return out


@pytest.mark.parametrize("mode", ["NextStep", "Disabled"])
def test_sb3_adapter_gives_the_same_trajectory_in_every_autoreset_mode(mode):
    """SB3 sees exactly the SameStep trajectory over a NextStep or Disabled env: the adapter
    restarts ended sub-envs with a partial reset in the step that ended them."""
    kwargs = dict(task="summarize", max_steps=3, token_mode="vocab")
    reference = _sb3_trajectory(as_sb3_vec_env(GenerationVectorEnv(3, **kwargs, **SAME_STEP)), 9)
    other = _sb3_trajectory(
        as_sb3_vec_env(GenerationVectorEnv(3, autoreset_mode=mode, **kwargs)), 9
    )
    assert sum(len(step[3]) for step in reference[1:]) >= 6  # episodes did end
    np.testing.assert_array_equal(reference[0], other[0])
    for (o1, r1, d1, e1, i1), (o2, r2, d2, e2, i2) in zip(reference[1:], other[1:]):
        np.testing.assert_allclose(o1, o2, atol=1e-5)
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_array_equal(d1, d2)
        assert len(e1) == len(e2) and i1 == i2
        for (t1, m1, tr1), (t2, m2, tr2) in zip(e1, e2):
            np.testing.assert_allclose(t1, t2, atol=1e-5)
            assert (m1, tr1) == (m2, tr2)


def test_sb3_adapter_over_gymnasium_sync_vector_env_in_its_default_mode():
    envs = gym.make_vec("textenvs/Summarize-v0", num_envs=2, vectorization_mode="sync", max_steps=2)
    assert envs.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    trajectory = _sb3_trajectory(as_sb3_vec_env(envs), 4)
    assert all(step[2].all() for step in trajectory[2::2])  # every second step ends both
    assert all(len(step[3]) == 2 for step in trajectory[2::2])


def test_a_disabled_autoreset_env_refuses_to_step_an_ended_sub_env():
    envs = GenerationVectorEnv(2, task="summarize", max_steps=1, autoreset_mode="Disabled")
    envs.reset(seed=0)
    _, _, terminated, truncated, _ = envs.step(np.array([5, 5]))
    assert (terminated | truncated).all()
    with pytest.raises(ValueError, match="reset_mask"):
        envs.step(np.array([5, 5]))
    obs, _ = envs.reset(options={"reset_mask": np.array([True, False])})
    with pytest.raises(ValueError, match=r"Sub-envs \[1\] ended"):
        envs.step(np.array([5, 5]))
    envs.reset(options={"reset_mask": np.array([False, True])})
    envs.step(np.array([5, 5]))  # both restarted: stepping works again


@pytest.mark.parametrize("mode", ["NextStep", "SameStep", "Disabled"])
@pytest.mark.parametrize("vector_class", [GenerationVectorEnv, EditVectorEnv])
def test_step_unfinished_lets_ended_sub_envs_sit_out_in_any_mode(mode, vector_class):
    # One episode per sub-env (token PPO's rollouts): an ended sub-env is neither reset nor
    # stepped and reports nothing; the others go on exactly as single envs.
    kwargs = dict(task="summarize", max_steps=3)
    if vector_class is EditVectorEnv:
        kwargs.update(max_len=12, obs="positions")
    envs = vector_class(3, text_infos=True, autoreset_mode=mode, **kwargs)
    singles = [vector_class.env_class(**kwargs) for _ in range(3)]
    envs.reset(seed=5)
    for i, env in enumerate(singles):
        env.reset(seed=5 + i)
        env.action_space.seed(i)
    done = np.zeros(3, dtype=bool)
    for t in range(4):
        actions = np.array([env.action_space.sample() for env in singles])
        if t == 0:  # sub-env 0 ends at once: EOS, or the edit env's stop
            actions[0] = [3, 0, 0] if vector_class is EditVectorEnv else singles[0].lm.eos_token_id
        obs, reward, terminated, truncated, infos = envs.step_unfinished(actions)
        for i, env in enumerate(singles):
            if done[i]:  # sat out: nothing reported, nothing changed
                sat_out = (reward[i], terminated[i], truncated[i], infos.get("_text", [0] * 3)[i])
                assert sat_out == (0, 0, 0, 0)
                continue
            o, r, te, tr, info = env.step(actions[i])
            np.testing.assert_allclose(obs[i], o, atol=1e-4)
            assert (reward[i], terminated[i], truncated[i]) == pytest.approx((r, te, tr))
            assert infos["text"][i] == info["text"]
            done[i] = te or tr
        assert done[0] and "final_info" not in infos  # nothing restarted, in any mode
    assert done.all() and infos == {}  # the last step found every sub-env ended: nothing ran
    assert [env.text for env in envs.envs] == [env.text for env in singles]
    if mode == "Disabled":  # the ended sub-envs still wait for their reset
        with pytest.raises(ValueError, match="reset_mask"):
            envs.step(np.zeros(envs.action_space.shape, dtype=np.int64))
    else:  # the next plain step is their reset
        _, reward, *_ = envs.step(np.zeros(envs.action_space.shape, dtype=np.int64))
        assert (reward == 0).all()


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_gymnasium_vector_wrappers_work_on_make_vec(env_id):
    """gymnasium's own vector wrappers over gym.make_vec(id) as it comes (NextStep, gymnasium's
    default); RecordEpisodeStatistics counts each episode's return once, and SB3's adapter still
    runs over a wrapped env."""
    from gymnasium.wrappers.vector import (
        NormalizeObservation,
        NormalizeReward,
        RecordEpisodeStatistics,
        TransformReward,
    )

    kwargs = {**FAST_KWARGS[env_id], "max_steps": 2}
    envs = RecordEpisodeStatistics(
        TransformReward(
            NormalizeReward(NormalizeObservation(gym.make_vec(env_id, num_envs=2, **kwargs))),
            lambda r: np.clip(r, -5, 5),
        )
    )
    envs.action_space.seed(0)
    obs, _ = envs.reset(seed=0)
    returns, episodes = np.zeros(2), []
    for _ in range(6):
        obs, rewards, terminated, truncated, infos = envs.step(envs.action_space.sample())
        assert np.isfinite(obs).all() and np.isfinite(rewards).all()
        returns += rewards
        for i in np.flatnonzero(terminated | truncated):
            assert infos["_episode"][i]
            assert infos["episode"]["r"][i] == pytest.approx(returns[i], abs=1e-4)
            episodes.append(i)
            returns[i] = 0.0
    assert len(episodes) >= 2
    # NormalizeObservation refuses partial resets (gymnasium's choice), so SB3 users take
    # VecNormalize; reward and statistics wrappers pass through to SB3
    venv = as_sb3_vec_env(
        RecordEpisodeStatistics(
            TransformReward(gym.make_vec(env_id, num_envs=2, **kwargs), lambda r: 2 * r)
        )
    )
    venv.reset()
    ended = 0
    for _ in range(4):
        _, rewards, dones, infos = venv.step(
            np.stack([venv.action_space.sample() for _ in range(2)])
        )
        assert np.isfinite(rewards).all()
        ended += sum("terminal_observation" in info for info in infos)
    assert ended >= 2


def test_maskable_ppo_on_batched_edit_env():
    pytest.importorskip("sb3_contrib")
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.callbacks import BaseCallback

    class RecordValidity(BaseCallback):
        def __init__(self):
            super().__init__()
            self.valid = []

        def _on_step(self):
            self.valid += [info["valid"] for info in self.locals["infos"]]
            return True

    venv = as_sb3_vec_env(
        gym.make_vec("textenvs/EditSummary-v0", num_envs=2, max_len=8, max_steps=4, k=2)
    )
    record = RecordValidity()
    model = MaskablePPO("MlpPolicy", venv, n_steps=8, batch_size=8, n_epochs=1, seed=0)
    model.learn(32, callback=record)
    # The batched env's masks reach MaskablePPO: the per-dimension mask never allows an op that is
    # impossible for the text (every edit after reset is an insert, delete, replace or stop).
    assert model.num_timesteps == 32 and len(record.valid) == 32
    assert np.mean(record.valid) > 0.5


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
    # gymnasium's default context (fork) in this pytest process, whose torch pool has run
    envs = gym.make_vec(
        "textenvs/Translate-v0", num_envs=2, vectorization_mode="async", max_steps=3
    )
    try:
        obs, _ = envs.reset(seed=0)
        assert obs.shape == (2, 128)
        envs.step(envs.action_space.sample())
    finally:
        envs.close()


def test_sb3_adapter_honours_indices():
    envs = GenerationVectorEnv(3, text_infos=True, task="summarize", max_steps=6)
    venv = as_sb3_vec_env(envs)
    venv.reset()
    venv.step(np.array([11, 12, 13]))
    before = [list(env.generated) for env in envs.envs]
    venv.env_method("reset", indices=[1], seed=5)
    # only sub-env 1 was reset
    assert [list(env.generated) for env in envs.envs] == [before[0], [], before[2]]
    single = gym.make("textenvs/Summarize-v0", max_steps=6).unwrapped
    single.reset(seed=5)
    obs, *_ = venv.step(np.array([21, 22, 23]))  # the batch takes the new episode in
    np.testing.assert_allclose(obs[1], single.step(22)[0], atol=1e-4)
    assert envs.envs[0].generated == before[0] + [21]
    assert venv.get_attr("max_steps", indices=[2]) == [6]
    venv.set_attr("render_mode", "ansi", indices=2)
    assert [env.render_mode for env in envs.envs] == [None, None, "ansi"]
    assert venv.env_method("render", indices=[0, 2])[0] is None
    assert venv.get_attr("render_mode") == [None, None, "ansi"]


def test_vector_envs_carry_gymnasium_1x_attributes():
    for mode in ("SameStep", "NextStep"):
        envs = gym.make_vec("textenvs/Summarize-v0", num_envs=2, autoreset_mode=mode, max_steps=2)
        assert (
            envs.unwrapped.autoreset_mode == AutoresetMode(mode) == envs.metadata["autoreset_mode"]
        )
        assert "rgb_array" in envs.metadata["render_modes"]


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_batched_infos_are_numeric_by_default_and_text_infos_adds_the_strings(env_id):
    """TorchRL's GymWrapper cannot stack strings: the batched envs leave them out unless asked."""
    kwargs = {**FAST_KWARGS[env_id], "max_steps": 2}
    plain = gym.make_vec(env_id, num_envs=2, **kwargs, **SAME_STEP)
    full = gym.make_vec(env_id, num_envs=2, text_infos=True, **kwargs, **SAME_STEP)
    plain.action_space.seed(0)
    pairs = [(plain.reset(seed=3)[1], full.reset(seed=3)[1])]
    for _ in range(4):  # long enough for episodes to end and carry final_info
        actions = plain.action_space.sample()
        pairs.append((plain.step(actions)[4], full.step(actions)[4]))
    strings = {"prompt", "text", "reference", "metric_name"}

    def keys(infos: dict) -> set[str]:
        return {k for k, v in infos.items() if not k.startswith("_")}

    for a, b in pairs:
        # metric_name comes with the metric: every step when dense, at the end when terminal
        assert strings - {"metric_name"} <= keys(b) and not keys(a) & strings
        for key in keys(a) - {"final_obs", "final_info"}:
            assert a[key].dtype != object and np.array_equal(a[key], b[key]), key
        if "final_info" in a:
            assert not {k for k, v in a["final_info"].items() if v.dtype == object}
            assert keys(b["final_info"]) - keys(a["final_info"]) >= {"text", "prompt"}
    assert any("final_info" in a for a, _ in pairs)
    with pytest.raises(ValueError, match="text_infos must be True or False"):
        gym.make_vec(env_id, num_envs=2, text_infos="yes", **kwargs)


@pytest.mark.parametrize("token_mode", ["topk", "vocab"])
def test_batched_candidate_observations_equal_single_envs(token_mode):
    kwargs = dict(task="summarize", max_steps=4, token_mode=token_mode, k=4, candidates_obs=True)
    envs = GenerationVectorEnv(3, **kwargs, **SAME_STEP)
    singles = [GenerationVectorEnv.env_class(**kwargs) for _ in range(3)]
    obs, _ = envs.reset(seed=5)
    single = [env.reset(seed=5 + i)[0] for i, env in enumerate(singles)]
    rng = np.random.default_rng(1)
    for _ in range(6):
        np.testing.assert_allclose(obs, np.stack(single), atol=1e-4)
        actions = rng.integers(0, 4, size=3)
        obs, _, terminated, truncated, infos = envs.step(actions)
        single = []
        for i, env in enumerate(singles):
            o, _, te, tr, _ = env.step(int(actions[i]))
            single.append(env.reset()[0] if te or tr else o)


def test_reset_takes_one_sample_index_per_sub_env():
    """options["index"] as a list: sub-env i plays sample index[i], all in one batched reset,
    each exactly as a single env reset to that sample."""
    envs = GenerationVectorEnv(4, text_infos=True, task="summarize", max_steps=3)
    obs, infos = envs.reset(seed=0, options={"index": [5, 5, 9, 9]})
    assert list(infos["index"]) == [5, 5, 9, 9]
    single = gym.make("textenvs/Summarize-v0", max_steps=3).unwrapped
    for i, j in enumerate([5, 5, 9, 9]):
        o, info = single.reset(seed=i, options={"index": j})
        np.testing.assert_allclose(obs[i], o, atol=1e-4)
        assert infos["prompt"][i] == info["prompt"]
    with pytest.raises(ValueError, match="holds 2 indices for 4 sub-envs"):
        envs.reset(options={"index": [1, 2]})


def test_a_batched_reset_of_long_prompts_hands_its_working_memory_back(monkeypatch):
    """After a batched prefill of many tokens, glibc kept its freed working memory resident:
    214 MB a sub-env instead of the 72 MB KV cache at the 124M layout (benchmarks.workloads)."""
    import sys

    from textenvs import system, vector

    calls = []
    monkeypatch.setattr(vector, "release_freed_memory", lambda: calls.append(1) or True)
    envs = gym.make_vec("textenvs/Summarize-v0", num_envs=2, max_steps=2)
    envs.reset(seed=0)
    assert calls == []  # two short prompts: nothing worth handing back
    monkeypatch.setattr(vector, "RELEASE_AFTER_TOKENS", 10)
    envs.reset(seed=1)
    assert calls == [1]
    envs.close()
    if sys.platform.startswith("linux"):
        assert system.release_freed_memory()  # glibc's malloc_trim is there and runs
