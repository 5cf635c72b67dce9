"""Agents: the Q-learning update by hand, FrozenLake, config errors, save/load, SB3 helpers,
discretizer.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from agents.common import evaluate_policy
from agents.qlearning import QLearning, QLearningConfig, make_tabular_env, q_update
from textenvs.wrappers import DiscretizeObservation, FlattenEditActions


def test_q_update_two_state_mdp_by_hand():
    # States 0 -> 1 -> terminal. Q(1, .) = [2, 5]; alpha 0.5, gamma 0.9.
    q = np.array([[0.0, 1.0], [2.0, 5.0]])
    td = q_update(q, s=0, a=0, r=1.0, s_next=1, terminal=False, alpha=0.5, gamma=0.9)
    assert td == pytest.approx(1.0 + 0.9 * 5.0 - 0.0)
    assert q[0, 0] == pytest.approx(0.5 * 5.5)
    # Terminal: no bootstrap.
    q_update(q, s=1, a=1, r=3.0, s_next=0, terminal=True, alpha=0.5, gamma=0.9)
    assert q[1, 1] == pytest.approx(5.0 + 0.5 * (3.0 - 5.0))
    # A mask restricts the max over next actions: only action 0 (value 2) is valid in state 1.
    q_update(
        q,
        s=0,
        a=1,
        r=0.0,
        s_next=1,
        terminal=False,
        alpha=1.0,
        gamma=1.0,
        next_mask=np.array([True, False]),
    )
    assert q[0, 1] == pytest.approx(2.0)


def test_learns_deterministic_frozenlake():
    env = gym.make("FrozenLake-v1", is_slippery=False, map_name="4x4")
    agent = QLearning(
        env, QLearningConfig(learning_rate=0.5, gamma=0.95, epsilon_decay_fraction=0.6, seed=0)
    )
    agent.learn(8000)
    result = agent.evaluate(episodes=20)
    assert result["mean_return"] == 1.0


@pytest.mark.parametrize(
    "env_factory,config,match",
    [
        (
            lambda: gym.make("textenvs/Summarize-v0", token_mode="topk"),
            QLearningConfig(),
            "DiscretizeObservation",
        ),
        (lambda: gym.make("CartPole-v1"), QLearningConfig(), "DiscretizeObservation"),
        (lambda: gym.make("FrozenLake-v1"), QLearningConfig(learning_rate=0.0), "learning_rate"),
        (
            lambda: gym.make("FrozenLake-v1"),
            QLearningConfig(require_action_masks=True),
            "FlattenEditActions",
        ),
    ],
)
def test_bad_configs_fail_at_construction(env_factory, config, match):
    with pytest.raises(ValueError, match=match):
        QLearning(env_factory(), config)


def test_multidiscrete_actions_need_the_flattener():
    env = DiscretizeObservation(gym.make("textenvs/EditSummary-v0", max_len=8), n_bits=4, n_fit=32)
    with pytest.raises(ValueError, match="FlattenEditActions"):
        QLearning(env)


def test_discretizer_is_deterministic_for_a_seed():
    make = lambda seed, method: DiscretizeObservation(  # noqa: E731
        gym.make("textenvs/Translate-v0", token_mode="topk", k=3, max_steps=6),
        method=method,
        n_bits=6,
        n_clusters=8,
        n_fit=48,
        seed=seed,
    )
    for method in ("hash", "kmeans"):
        a, b = make(0, method), make(0, method)
        oa, _ = a.reset(seed=5)
        ob, _ = b.reset(seed=5)
        assert oa == ob and a.observation_space.contains(oa)
        for action in [0, 1, 2, 0]:
            assert a.step(action)[0] == b.step(action)[0]
    c = make(1, "hash")
    assert not np.array_equal(c.planes, make(0, "hash").planes)


def test_fitted_discretizer_is_reused_on_another_split():
    train = make_tabular_env(
        "textenvs/Summarize-v0", "train", 3, "kmeans", 4, 8, 0, n_fit=64, max_steps=4
    )
    test = make_tabular_env(
        "textenvs/Summarize-v0", "test", 3, "kmeans", 4, 8, 0, fitted=train, max_steps=4
    )
    assert test.centroids is train.centroids
    x = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    assert train.observation(x) == test.observation(x)


def test_discretizer_bad_arguments():
    env = gym.make("textenvs/Summarize-v0", max_steps=3)
    with pytest.raises(ValueError, match="method="):
        DiscretizeObservation(env, method="pca")
    with pytest.raises(ValueError, match="n_bits"):
        DiscretizeObservation(env, n_bits=40)


def test_qlearning_round_trip_on_edit_env(tmp_path):
    env = make_tabular_env(
        "textenvs/EditSummary-v0", "train", 2, "hash", 6, 8, 0, n_fit=64, max_len=8, max_steps=4
    )
    assert isinstance(env.env, FlattenEditActions)
    agent = QLearning(env, QLearningConfig(seed=0, require_action_masks=True))
    episodes = agent.learn(100)
    assert episodes and all(np.isfinite(e["return"]) for e in episodes)
    path = tmp_path / "q.npz"
    agent.save(path)
    loaded = QLearning.load(path, env)
    np.testing.assert_array_equal(loaded.q, agent.q)
    assert loaded.config == agent.config
    test = make_tabular_env(
        "textenvs/EditSummary-v0",
        "test",
        2,
        "hash",
        6,
        8,
        0,
        fitted=env,
        n_fit=64,
        max_len=8,
        max_steps=4,
    )
    result = loaded.evaluate(test, max_samples=5)
    assert result["episodes"] == 5 and 0.0 <= result["mean_metric"] <= 1.0
    other = make_tabular_env(
        "textenvs/EditSummary-v0", "train", 3, "hash", 6, 8, 0, n_fit=64, max_len=8, max_steps=4
    )
    with pytest.raises(ValueError, match="shape"):
        QLearning.load(path, other)


@pytest.mark.parametrize("method", ["hash", "kmeans"])
def test_a_qlearning_save_holds_the_env_and_discretizer(tmp_path, method):
    """Nothing but the file: the env, its wrappers and the fitted map come back, same actions."""
    env = make_tabular_env(
        "textenvs/EditSummary-v0", "train", 2, method, 6, 8, 0, n_fit=64, max_len=8, max_steps=4
    )
    agent = QLearning(env, QLearningConfig(seed=0))
    agent.learn(60)
    path = agent.save(tmp_path / "q")
    loaded = QLearning.load(path, split="test")
    assert isinstance(loaded.env.env, FlattenEditActions)
    assert loaded.env.unwrapped.split == "test" and loaded.env.unwrapped.max_len == 8
    probe = gym.make("textenvs/EditSummary-v0", split="test", k=2, max_len=8, max_steps=4)
    raw = [probe.reset(seed=s)[0] for s in range(6)]
    assert [loaded.env.observation(o) for o in raw] == [env.observation(o) for o in raw]
    np.testing.assert_array_equal(loaded.q, agent.q)
    result = loaded.evaluate(max_samples=3)
    assert result["episodes"] == 3
    # A raw env given by the caller gets the saved discretizer around it.
    given = FlattenEditActions(gym.make("textenvs/EditSummary-v0", k=2, max_len=8, max_steps=4))
    assert QLearning.load(path, given).env.observation(raw[0]) == env.observation(raw[0])
    with pytest.raises(ValueError, match="only when the env is rebuilt"):
        QLearning.load(path, given, split="test")
    with np.load(path) as data:
        fields = dict(data)
    fields["discretizer_mean"] = fields["discretizer_mean"][:3]
    np.savez(tmp_path / "bad.npz", **fields)
    with pytest.raises(ValueError, match="bad.npz: discretizer field 'mean'"):
        QLearning.load(tmp_path / "bad.npz")
    for env_field, match in (("{not json", "field 'env' is not JSON"), ("[1]", "field 'env' is")):
        with np.load(path) as data:
            fields = dict(data)
        fields["env"] = env_field
        np.savez(tmp_path / "bad_env.npz", **fields)
        with pytest.raises(ValueError, match=match):
            QLearning.load(tmp_path / "bad_env.npz")


def test_a_qlearning_save_of_an_unrebuildable_env_asks_for_it(tmp_path):
    env = gym.make("FrozenLake-v1")
    agent = QLearning(gym.wrappers.RecordEpisodeStatistics(env))
    path = agent.save(tmp_path / "q")
    with pytest.raises(ValueError, match="pass env= to QLearning.load"):
        QLearning.load(path)
    assert QLearning.load(path, env).q.shape == (16, 4)
    plain = QLearning(gym.make("FrozenLake-v1", is_slippery=False)).save(tmp_path / "plain")
    assert QLearning.load(plain).env.spec.kwargs["is_slippery"] is False


def test_masked_exploration_only_picks_valid_actions():
    env = make_tabular_env(
        "textenvs/EditSummary-v0", "train", 2, "hash", 4, 8, 0, n_fit=32, max_len=6, max_steps=30
    )
    agent = QLearning(env, QLearningConfig(seed=1))
    env.reset(seed=0)
    for _ in range(40):
        mask = env.action_masks()
        a = agent.act(0, epsilon=1.0, mask=mask)
        assert mask[a]
        _, _, terminated, truncated, info = env.step(a)
        assert info["valid"]
        if terminated or truncated:
            env.reset()


def test_evaluate_policy_plays_each_test_sample_once():
    env = gym.make("textenvs/Summarize-v0", split="test", token_mode="topk", k=2, max_steps=3)
    result = evaluate_policy(env, lambda obs, mask: 0, max_samples=7)
    assert result["episodes"] == 7 and len(result["metrics"]) == 7


def test_sb3_ppo_round_trip(tmp_path):
    pytest.importorskip("stable_baselines3")
    from agents import sb3

    kwargs = {"token_mode": "topk", "k": 3, "max_steps": 4}
    config = sb3.SB3Config(
        num_envs=2, n_steps=8, batch_size=8, n_epochs=1, tensorboard_log=str(tmp_path / "tb")
    )
    model = sb3.build("textenvs/Summarize-v0", config, **kwargs)
    callback = sb3.metric_callback()
    model.learn(32, callback=callback)
    assert callback.history and all(0 <= m <= 1 for _, m in callback.history)
    assert any((tmp_path / "tb").rglob("events.out.tfevents*"))
    sb3.save(model, tmp_path / "ppo", config, "textenvs/Summarize-v0", kwargs)
    loaded, meta = sb3.load(tmp_path / "ppo")
    obs = np.zeros(128, dtype=np.float32)
    assert model.predict(obs, deterministic=True)[0] == loaded.predict(obs, deterministic=True)[0]
    result = sb3.evaluate(loaded, "textenvs/Summarize-v0", max_samples=4, **kwargs)
    assert result["episodes"] == 4
    # The SB3 way: the zip, then the saved statistics around a fresh env; the same actions.
    from stable_baselines3 import PPO

    plain = PPO.load(tmp_path / "ppo" / "model.zip")
    venv = sb3.normalizer(tmp_path / "ppo", sb3.make_vec_env("textenvs/Summarize-v0", 2, **kwargs))
    raw = np.random.default_rng(0).standard_normal((2, 128)).astype(np.float32)
    ours = loaded.predict(loaded.get_env().normalize_obs(raw), deterministic=True)[0]
    np.testing.assert_array_equal(
        plain.predict(venv.normalize_obs(raw), deterministic=True)[0], ours
    )
    assert not np.allclose(venv.normalize_obs(raw), raw)  # the statistics do change what it sees
    assert sb3.load(tmp_path / "ppo" / "model.zip")[1] == meta  # the zip path loads the folder
    (tmp_path / "bare").mkdir()
    (tmp_path / "ppo" / "model.zip").rename(tmp_path / "bare" / "model.zip")
    with pytest.raises(ValueError, match="no sb3_config.json beside it"):
        sb3.load(tmp_path / "bare" / "model.zip")
    with pytest.warns(UserWarning, match="holds no obs_normalization.npz"):
        assert sb3.normalizer(tmp_path / "bare", venv.venv) is venv.venv


def test_sb3_maskable_ppo_on_edit_env_and_bad_algo(tmp_path, monkeypatch):
    pytest.importorskip("sb3_contrib")
    import tempfile

    from agents import sb3

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where SB3 puts its own log folders
    kwargs = {"k": 2, "max_len": 8, "max_steps": 3}
    model = sb3.build(
        "textenvs/EditSummary-v0",
        sb3.SB3Config(algo="maskable_ppo", num_envs=2, n_steps=8, batch_size=8, n_epochs=1),
        **kwargs,
    )
    model.learn(8)
    model.learn(8, reset_num_timesteps=False)
    assert not list(tmp_path.iterdir())  # no empty SB3-<date> folder per learn() call
    assert sb3.evaluate(model, "textenvs/EditSummary-v0", max_samples=2, **kwargs)["episodes"] == 2
    with pytest.raises(ValueError, match="action_masks"):
        sb3.build(
            "textenvs/Summarize-v0", sb3.SB3Config(algo="maskable_ppo", num_envs=2), max_steps=3
        )
    with pytest.raises(ValueError, match="algo="):
        sb3.build("textenvs/Summarize-v0", sb3.SB3Config(algo="dqn"))


def test_qlearning_cli_runs_on_any_gymnasium_env(tmp_path):
    from agents import qlearning

    result = qlearning.main(
        [
            "--env-id",
            "FrozenLake-v1",
            "--total-steps",
            "500",
            "--eval-samples",
            "5",
            "--save",
            str(tmp_path / "q"),
        ]
    )
    assert result["episodes"] == 5 and np.isfinite(result["mean_return"])
    result = qlearning.main(
        ["--env-id", "CartPole-v1", "--total-steps", "300", "--eval-samples", "3", "--n-bits", "4"]
    )  # Box observations, discretized
    assert result["episodes"] == 3 and result["mean_return"] > 0


@pytest.mark.parametrize("token_mode", ["topk", "vocab"])
def test_lm_prior_policy_starts_exactly_at_the_lm(token_mode):
    """At initialisation: the LM's distribution over the actions, and its greedy token."""
    pytest.importorskip("stable_baselines3")
    import torch

    from agents import sb3

    kwargs = {"token_mode": token_mode, "k": 4, "max_steps": 4, "candidates_obs": True}
    config = sb3.SB3Config(policy="lm_prior", num_envs=2, n_steps=8, batch_size=8, n_epochs=1)
    model = sb3.build("textenvs/Summarize-v0", config, **kwargs)
    env = gym.make("textenvs/Summarize-v0", **kwargs)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        logits = env.unwrapped.logits.float()
        n = env.action_space.n
        expected = torch.log_softmax(logits, -1)
        if token_mode == "topk":
            expected = torch.log_softmax(expected[torch.as_tensor(env.unwrapped.candidates)], -1)
        dist = model.policy.get_distribution(torch.as_tensor(obs[None]))
        np.testing.assert_allclose(
            dist.distribution.logits[0].detach().numpy(), expected.numpy(), atol=1e-5
        )
        action = int(model.predict(obs, deterministic=True)[0])
        assert action == (0 if token_mode == "topk" else int(logits.argmax()))
        assert obs.shape == (
            n + env.unwrapped.lm.hidden_size + (40 if token_mode == "topk" else 0),
        )
        obs, *_ = env.step(action)
    model.learn(16)  # forward and evaluate_actions read the prior as well
    with pytest.raises(ValueError, match="candidates_obs=True"):
        sb3.build("textenvs/Summarize-v0", config, token_mode="topk", k=4)
    with pytest.raises(ValueError, match="policy='cnn' is not valid"):
        sb3.SB3Config(policy="cnn").validate()


def test_lm_prior_candidate_head_scores_each_candidate_by_its_own_features():
    """Top-k mode: one network scores every candidate from its block (embedding numbers, copy
    flags), so permuting the candidates permutes their scores; it is trained (in the optimizer);
    vocabulary mode has no such block and no head."""
    pytest.importorskip("stable_baselines3")
    import torch

    from agents import sb3
    from textenvs.envs.generate import CANDIDATE_OBS_FEATURES as F

    kwargs = {"token_mode": "topk", "k": 4, "max_steps": 3, "candidates_obs": True}
    config = sb3.SB3Config(policy="lm_prior", num_envs=2, n_steps=8, batch_size=8)
    policy = sb3.build("textenvs/Summarize-v0", config, **kwargs).policy
    trained = {id(p) for group in policy.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in trained for p in policy.candidate_net.parameters())
    n, block = 4, 4 * (F + 1)
    with torch.no_grad():  # a non-zero head, no per-index part, a latent of the hidden state only
        policy.candidate_net[-1].weight.normal_()
        policy.action_net.weight.zero_()
        policy.mlp_extractor.policy_net[0].weight[:, -block:] = 0.0
    obs = torch.randn(3, policy.observation_space.shape[0])
    order = torch.tensor([2, 0, 3, 1])
    permuted = obs.clone()
    permuted[:, -block:-n] = obs[:, -block:-n].unflatten(-1, (n, F))[:, order].flatten(1)
    permuted[:, -n:] = obs[:, -n:][:, order]
    with torch.no_grad():
        logits = policy.get_distribution(obs).distribution.logits
        moved = policy.get_distribution(permuted).distribution.logits
    torch.testing.assert_close(moved, logits[:, order])
    assert not torch.allclose(logits, torch.log_softmax(obs[:, -n:], -1))  # the head acts
    vocab = sb3.build(
        "textenvs/Summarize-v0", config, token_mode="vocab", max_steps=3, candidates_obs=True
    ).policy
    assert vocab.candidate_net is None
    with pytest.raises(ValueError, match=r"candidate_features.* must be an int"):
        sb3.build(
            "textenvs/Summarize-v0",
            sb3.SB3Config(policy="lm_prior", policy_kwargs={"candidate_features": -1}),
            **kwargs,
        )


def test_lm_prior_policy_round_trips_through_a_checkpoint(tmp_path):
    pytest.importorskip("stable_baselines3")
    from agents import sb3

    kwargs = {"token_mode": "topk", "k": 3, "max_steps": 3, "candidates_obs": True}
    config = sb3.SB3Config(policy="lm_prior", num_envs=2, n_steps=8, batch_size=8, n_epochs=1)
    model = sb3.build("textenvs/Summarize-v0", config, **kwargs)
    model.learn(16)
    sb3.save(model, tmp_path / "prior", config, "textenvs/Summarize-v0", kwargs)
    assert not (tmp_path / "prior" / "obs_normalization.npz").exists()
    loaded, _ = sb3.load(tmp_path / "prior")
    obs = np.random.default_rng(0).standard_normal((5, model.observation_space.shape[0]))
    obs = obs.astype(np.float32)
    np.testing.assert_array_equal(
        loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0]
    )


PRIOR_ENV = {"token_mode": "topk", "k": 4, "max_steps": 3, "candidates_obs": True}


def prior_model(**fields):
    """SB3 PPO with LMPriorPolicy on Summarize in top-k mode (PRIOR_ENV), a tiny rollout."""
    from agents import sb3

    config = sb3.SB3Config(policy="lm_prior", num_envs=2, n_steps=8, batch_size=8, **fields)
    return sb3.build("textenvs/Summarize-v0", config, **PRIOR_ENV)


def test_lm_prior_policy_bounds_its_correction():
    pytest.importorskip("stable_baselines3")
    import torch

    from agents import sb3

    kwargs = PRIOR_ENV
    model = prior_model(policy_kwargs={"max_correction": 0.5})
    with torch.no_grad():
        model.policy.action_net.bias.fill_(100.0)  # a huge correction is squashed to 0.5 nats
    obs = torch.as_tensor(
        np.random.default_rng(0).standard_normal((3, model.observation_space.shape[0])),
        dtype=torch.float32,
    )
    logits = model.policy.get_distribution(obs).distribution.logits
    expected = torch.log_softmax(obs[:, -4:] + 0.5, -1)
    np.testing.assert_allclose(logits.detach().numpy(), expected.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match=r"max_correction.* must be a finite number > 0"):
        sb3.build(
            "textenvs/Summarize-v0",
            sb3.SB3Config(policy="lm_prior", policy_kwargs={"max_correction": 0}),
            **kwargs,
        )


def test_lm_prior_policy_tempers_its_prior_and_penalises_the_kl_to_it():
    """prior_temperature T: at the start the policy is the LM at temperature T and still acts as
    the greedy LM; kl_to_prior: the entropy term PPO's ent_coef weighs is -KL(policy || prior),
    zero at the start, the exact KL once the correction moves, and its gradient pulls back."""
    pytest.importorskip("stable_baselines3")
    import torch

    from agents import sb3

    kwargs = PRIOR_ENV
    model = prior_model(
        n_epochs=1, ent_coef=0.5, policy_kwargs={"prior_temperature": 0.5, "kl_to_prior": True}
    )
    policy = model.policy
    env = gym.make("textenvs/Summarize-v0", **kwargs)
    obs, _ = env.reset(seed=0)
    batch = torch.as_tensor(obs[None])
    tempered = torch.log_softmax(torch.as_tensor(env.unwrapped.action_logprobs()) / 0.5, -1)
    logits = policy.get_distribution(batch).distribution.logits[0].detach()
    torch.testing.assert_close(logits, tempered, atol=1e-5, rtol=0)
    assert int(model.predict(obs, deterministic=True)[0]) == 0
    _, _, entropy = policy.evaluate_actions(batch, torch.tensor([1]))
    assert abs(float(entropy[0])) < 1e-6  # no KL at the start
    with torch.no_grad():
        policy.action_net.bias.copy_(torch.tensor([0.0, 2.0, -1.0, 0.5]))
    _, _, entropy = policy.evaluate_actions(batch, torch.tensor([1]))
    moved = torch.distributions.Categorical(logits=tempered + policy.action_net.bias.detach())
    kl = torch.distributions.kl_divergence(moved, torch.distributions.Categorical(logits=tempered))
    torch.testing.assert_close(-entropy[0].detach(), kl, atol=1e-5, rtol=0)
    (-entropy.sum()).backward()  # what PPO minimises: ent_coef * KL; it pulls the bias back
    assert float(policy.action_net.bias.grad[1]) > 0 > float(policy.action_net.bias.grad[2])
    model.learn(16)  # PPO's update reads the KL in place of the entropy
    with pytest.raises(ValueError, match=r"prior_temperature.* must be a finite number > 0"):
        sb3.build(
            "textenvs/Summarize-v0",
            sb3.SB3Config(policy="lm_prior", policy_kwargs={"prior_temperature": 0}),
            **kwargs,
        )
    with pytest.raises(ValueError, match=r"kl_to_prior.* must be True or False"):
        sb3.build(
            "textenvs/Summarize-v0",
            sb3.SB3Config(policy="lm_prior", policy_kwargs={"kl_to_prior": "yes"}),
            **kwargs,
        )


def test_qlearning_with_the_lm_prior_starts_as_the_greedy_lm():
    env = make_tabular_env(
        "textenvs/Summarize-v0", "test", 3, "hash", 6, 8, 0, n_fit=32, max_steps=4
    )
    agent = QLearning(env, QLearningConfig(lm_prior=0.01))
    plain = QLearning(env, QLearningConfig(seed=1))
    lm = gym.make("textenvs/Summarize-v0", split="test", token_mode="topk", k=3, max_steps=4)
    greedy = evaluate_policy(lm, lambda obs, mask: 0, max_samples=6)
    assert agent.evaluate(max_samples=6)["metrics"] == greedy["metrics"]  # Q = 0: the LM decides
    assert plain.evaluate(max_samples=6)["metrics"] != greedy["metrics"]  # Q = 0: coin flips
    agent.q[:, 2] = 1.0  # a learned preference outweighs the prior
    state, _ = env.reset(seed=0)
    assert agent.act(state, 0.0, None, env) == 2
    with pytest.raises(ValueError, match="lm_prior=0.01 needs a generation env in top-k mode"):
        QLearning(gym.make("FrozenLake-v1"), QLearningConfig(lm_prior=0.01))
    edit = make_tabular_env(
        "textenvs/EditSummary-v0", "test", 3, "hash", 6, 8, 0, n_fit=32, max_steps=3, max_len=12
    )
    agent = QLearning(edit, QLearningConfig(lm_prior=0.01))  # on an edit env: keep the draft
    draft = evaluate_policy(edit, lambda obs, mask: 0, max_samples=4)["metrics"]  # stop at once
    assert agent.evaluate(max_samples=4)["metrics"] == draft
    assert QLearning(edit, QLearningConfig(seed=1)).evaluate(max_samples=4)["metrics"] != draft
    with pytest.raises(ValueError, match=r"lm_prior must be a finite number in \[0, 1000\]"):
        QLearningConfig(lm_prior=-1).validate()


EDIT_PRIOR_KWARGS = {
    "token_mode": "topk",
    "k": 3,
    "max_len": 10,
    "max_steps": 3,
    "candidates_obs": True,
    "flat_actions": True,
}


def test_edit_prior_policy_starts_at_the_draft_and_scores_each_edit_by_its_own_numbers(tmp_path):
    """At initialisation: stop (the LM's draft) is the deterministic action and every edit has the
    same logit; an edit's logit reads its own row of the candidate block only; MaskablePPO trains
    it through agents.sb3 and a checkpoint round trip keeps it."""
    pytest.importorskip("sb3_contrib")
    import torch

    from agents import sb3
    from textenvs.envs.edit import candidate_row_size

    config = sb3.SB3Config(
        algo="maskable_ppo", policy="lm_prior", num_envs=2, n_steps=8, batch_size=8, n_epochs=1
    )
    model = sb3.build("textenvs/EditSummary-v0", config, **EDIT_PRIOR_KWARGS)
    policy = model.policy
    assert type(policy).__name__ == "EditPriorPolicy"
    env = gym.make("textenvs/EditSummary-v0", **EDIT_PRIOR_KWARGS)
    obs, _ = env.reset(seed=0)
    mask = env.unwrapped.action_masks()
    assert int(model.predict(obs, deterministic=True, action_masks=mask)[0]) == 0  # stop
    with torch.no_grad():
        logits = policy.get_distribution(torch.as_tensor(obs[None])).distribution.logits[0]
    assert float(logits[0]) > float(logits[1]) and torch.all(logits[1:] == logits[1])
    c, rows = candidate_row_size(3), 11
    with torch.no_grad():  # a non-zero edit head, a latent blind to the block
        policy.edit_net[-1].weight.normal_()
        policy.mlp_extractor.policy_net[0].weight[:, -rows * c :] = 0.0
        changed = obs.copy()
        changed[-rows * c :].reshape(rows, c)[4] += 1.0  # row 4 only
        a = policy.get_distribution(torch.as_tensor(obs[None])).distribution.logits[0]
        b = policy.get_distribution(torch.as_tensor(changed[None])).distribution.logits[0]
    codec = env.unwrapped.codec
    relative = (a - a[0]) - (b - b[0])  # stop's logit reads no row: it removes the normaliser
    moved = {codec.unflatten(i)[1] for i in np.flatnonzero(relative.abs().numpy() > 1e-4)}
    assert moved == {4}  # only edits at position 4
    model.learn(16)
    sb3.save(model, tmp_path / "edit", config, "textenvs/EditSummary-v0", EDIT_PRIOR_KWARGS)
    loaded, _ = sb3.load(tmp_path / "edit")
    np.testing.assert_array_equal(
        loaded.predict(obs, deterministic=True, action_masks=mask)[0],
        model.predict(obs, deterministic=True, action_masks=mask)[0],
    )


def test_edit_prior_policy_logit_is_its_head_on_the_latent_and_the_edits_own_numbers():
    """Every edit's logit is edit_net on [latent, kind one-hot, position / max_len, the written
    token's 3 numbers (0 for a delete), the text token's 4 numbers], built here edit by edit from
    the documented layout, with every layer of the head random."""
    pytest.importorskip("sb3_contrib")
    import torch

    from agents import sb3
    from textenvs.envs.edit import DELETE, candidate_row_size

    config = sb3.SB3Config(algo="maskable_ppo", policy="lm_prior", num_envs=1, n_steps=8)
    policy = sb3.build("textenvs/EditSummary-v0", config, **EDIT_PRIOR_KWARGS).policy
    env = gym.make("textenvs/EditSummary-v0", **EDIT_PRIOR_KWARGS)
    obs, _ = env.reset(seed=1)
    k, rows, codec = 3, 11, env.unwrapped.codec
    block = torch.as_tensor(obs[-rows * candidate_row_size(k) :]).reshape(rows, -1)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in policy.edit_net.parameters():
            parameter.normal_()
        x = torch.as_tensor(obs[None])
        latent = policy.mlp_extractor.forward_actor(policy.extract_features(x))[0]
        logits = policy.get_distribution(x).distribution.logits[0]
        expected = []
        for action in range(1, codec.n):
            op, position, token = codec.unflatten(action)
            row = block[position]
            written = torch.zeros(3) if op == DELETE else row[3 * token : 3 * token + 3]
            numbers = torch.cat(
                [
                    latent,
                    torch.nn.functional.one_hot(torch.tensor(op), 3).float(),
                    torch.tensor([position / codec.max_len]),
                    written,
                    row[3 * k :],
                ]
            )
            expected.append(policy.edit_net(numbers))
        expected = torch.cat([policy.stop_net(latent), torch.cat(expected)])
    torch.testing.assert_close(logits - logits[0], expected - expected[0], atol=1e-4, rtol=1e-5)


def test_edit_prior_policy_refuses_what_it_cannot_read():
    pytest.importorskip("sb3_contrib")
    from agents import sb3

    config = sb3.SB3Config(algo="maskable_ppo", policy="lm_prior", num_envs=1, n_steps=8)
    kwargs = {**EDIT_PRIOR_KWARGS, "flat_actions": False}
    with pytest.raises(ValueError, match="make the edit env with flat_actions=True"):
        sb3.build("textenvs/EditSummary-v0", config, **kwargs)
    wrong = sb3.SB3Config(**{**config.__dict__, "policy_kwargs": {"max_len": 9}})
    with pytest.raises(ValueError, match=r"EditPriorPolicy\(max_len=9, k=3\) expects"):
        sb3.build("textenvs/EditSummary-v0", wrong, **EDIT_PRIOR_KWARGS)
    bad = sb3.SB3Config(**{**config.__dict__, "policy_kwargs": {"stop_logit": 0.0}})
    with pytest.raises(ValueError, match=r"stop_logit.* must be a finite number > 0"):
        sb3.build("textenvs/EditSummary-v0", bad, **EDIT_PRIOR_KWARGS)


def test_batched_evaluation_equals_one_env_sample_by_sample():
    """evaluate_policy_batched plays the same samples in the same order as evaluate_policy, with
    the same per-sample metrics and returns (generation: a policy of the observation; edit: a
    policy of the mask), with fewer samples than sub-envs and with more."""
    from agents.common import evaluate_policy_batched

    def by_obs(obs, mask):  # depends on the observation, so a wrong obs would show
        return int(abs(float(obs[0])) * 1e4) % 3

    def by_mask(obs, mask):
        valid = np.flatnonzero(mask)
        return int(valid[len(valid) // 2])

    cases = [
        ("textenvs/Summarize-v0", {"token_mode": "topk", "k": 3, "max_steps": 5}, by_obs),
        ("textenvs/EditSummary-v0", {"k": 3, "max_steps": 3, "flat_actions": True}, by_mask),
    ]
    for env_id, kwargs, policy in cases:
        one = evaluate_policy(gym.make(env_id, split="test", **kwargs), policy, max_samples=11)
        for num_envs in (4, 16):
            envs = gym.make_vec(env_id, num_envs=num_envs, split="test", **kwargs)
            batched = evaluate_policy_batched(envs, policy, max_samples=11)
            assert batched["episodes"] == one["episodes"] == 11
            assert batched["metrics"] == one["metrics"]
            assert batched["mean_return"] == pytest.approx(one["mean_return"], abs=1e-9)
    assert len(set(one["metrics"])) > 1  # the policies reach different metrics: the test can fail


def test_sb3_cli_lm_prior_makes_the_env_the_policy_reads(tmp_path):
    """--policy lm_prior adds candidates_obs (and flat_actions on an edit env) through
    policy_env_kwargs, the one rule the CLI and the benchmark suite share; it trains, saves and
    evaluates on an edit id."""
    pytest.importorskip("sb3_contrib")
    import json

    from agents import sb3

    assert sb3.policy_env_kwargs("mlp", "textenvs/EditSummary-v0") == {}
    assert sb3.policy_env_kwargs("lm_prior", "textenvs/Summarize-v0") == {"candidates_obs": True}
    edit = {"candidates_obs": True, "flat_actions": True}
    assert sb3.policy_env_kwargs("lm_prior", "textenvs/EditSummary-v0") == edit
    folder = tmp_path / "cli"
    result = sb3.main(
        ["--env-id", "textenvs/EditSummary-v0", "--policy", "lm_prior", "--total-steps", "64"]
        + ["--num-envs", "1", "--k", "3", "--max-steps", "2", "--eval-samples", "2"]
        + ["--save", str(folder)]
    )
    assert result["algo"] == "maskable_ppo" and result["episodes"] == 2
    saved = json.loads((folder / "sb3_config.json").read_text())
    assert {k: saved["env_kwargs"][k] for k in edit} == edit
    loaded, _ = sb3.load(folder)
    assert type(loaded.policy).__name__ == "EditPriorPolicy"


def test_sb3_cli_last_block_sizes_the_context_and_trains_with_the_kl_penalty(tmp_path, capsys):
    """--policy last_block: the env the policy reads (context observation sized to the splits),
    its prior temperature and KL penalty, saved and reloaded; options that do not apply refused."""
    import json

    from agents import sb3
    from agents.last_block import fitting_positions

    folder = tmp_path / "cli"
    result = sb3.main(
        ["--env-id", "textenvs/Translate-v0", "--policy", "last_block", "--total-steps", "64"]
        + ["--num-envs", "2", "--k", "4", "--max-steps", "3", "--eval-samples", "2"]
        + ["--prior-temperature", "0.5", "--kl-coef", "0.05", "--save", str(folder)]
    )
    assert result["algo"] == "ppo" and result["episodes"] == 2
    saved = json.loads((folder / "sb3_config.json").read_text())
    assert saved["config"]["kl_coef"] == 0.05
    assert saved["config"]["policy_kwargs"] == {"prior_temperature": 0.5}
    kwargs = saved["env_kwargs"]
    assert (kwargs["obs"], kwargs["layer"], kwargs["candidates_obs"]) == ("context", -2, True)
    assert kwargs["context_positions"] == fitting_positions(
        "textenvs/Translate-v0", token_mode="topk", k=4, max_steps=3
    )
    loaded, _ = sb3.load(folder)
    assert type(loaded.policy).__name__ == "LastBlockPolicy"
    assert loaded.policy.prior_temperature == 0.5
    for argv, message in (
        (["--context-positions", "64"], "--context-positions applies to --policy last_block"),
        (["--prior-temperature", "0.5"], "--prior-temperature applies to PPO"),
    ):
        with pytest.raises(SystemExit):
            sb3.main(["--env-id", "textenvs/Translate-v0", *argv])
        assert message in capsys.readouterr().err


LAST_BLOCK_ENV = {"token_mode": "topk", "k": 4, "max_steps": 3, "context_positions": 64}


def last_block_model(**fields):
    """SB3 PPO with LastBlockPolicy on Translate (prior at temperature 0.5), a tiny rollout."""
    from agents import sb3

    fields.setdefault("policy_kwargs", {"prior_temperature": 0.5})
    config = sb3.SB3Config(policy="last_block", num_envs=2, n_steps=8, batch_size=8, **fields)
    kwargs = {**LAST_BLOCK_ENV, **sb3.policy_env_kwargs("last_block", "textenvs/Translate-v0")}
    return sb3.build("textenvs/Translate-v0", config, **kwargs), config, kwargs


def test_last_block_policy_starts_at_the_lm_and_trains_only_its_block(tmp_path, monkeypatch):
    """At the start the last-block actor samples the LM's tempered distribution over the
    candidates and acts as the greedy LM; PPO trains the block copy (not the LM, its final norm or
    head); a checkpoint round-trips; envs and settings it cannot use are refused clearly."""
    pytest.importorskip("stable_baselines3")
    import torch

    from agents import sb3

    model, config, kwargs = last_block_model(n_epochs=1, kl_coef=0.05)
    policy = model.policy
    env = gym.make("textenvs/Translate-v0", **kwargs)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        probs = policy.get_distribution(torch.as_tensor(obs[None])).distribution.probs[0]
        expected = torch.softmax(torch.as_tensor(env.unwrapped.action_logprobs()) / 0.5, -1)
        torch.testing.assert_close(probs.detach(), expected, atol=1e-5, rtol=0)
        assert int(model.predict(obs, deterministic=True)[0]) == 0
        obs, *_ = env.step(1)
    trained = {id(p) for group in policy.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in trained for p in policy.block.parameters())
    lm_before = [p.clone() for p in env.unwrapped.lm.model.parameters()]
    block_before = [p.detach().clone() for p in policy.block.parameters()]
    fixed_before = [t.clone() for t in (policy.head, *policy.ln_f.parameters())]
    model.learn(32, callback=sb3.train_callbacks(config))
    assert any(not torch.equal(a, b) for a, b in zip(block_before, policy.block.parameters()))
    assert all(
        torch.equal(a, b) for a, b in zip(fixed_before, (policy.head, *policy.ln_f.parameters()))
    )
    assert all(torch.equal(a, b) for a, b in zip(lm_before, env.unwrapped.lm.model.parameters()))
    sb3.save(model, tmp_path / "ckpt", config, "textenvs/Translate-v0", kwargs)
    assert (tmp_path / "ckpt" / "model.zip").stat().st_size < 5_000_000  # no LM inside
    loaded, meta = sb3.load(tmp_path / "ckpt")
    batch = torch.as_tensor(obs[None])
    torch.testing.assert_close(
        loaded.policy.get_distribution(batch).distribution.logits,
        policy.get_distribution(batch).distribution.logits,
    )
    with pytest.raises(ValueError, match="reads the input of the LM's last block"):
        sb3.build(
            "textenvs/Translate-v0",
            sb3.SB3Config(policy="last_block"),
            **{**kwargs, "layer": -1},
        )
    with pytest.raises(ValueError, match="reads the input of the LM's last block"):
        sb3.build("textenvs/EditSummary-v0", sb3.SB3Config(policy="last_block"), **kwargs)
    with pytest.raises(ValueError, match="use algo='ppo'"):
        sb3.SB3Config(policy="last_block", algo="maskable_ppo").validate()
    with pytest.raises(ValueError, match="kl_coef=0.1 penalises the KL to the LM prior"):
        sb3.SB3Config(kl_coef=0.1).validate()
    with pytest.raises(ValueError, match="kl_coef must be a finite number >= 0"):
        sb3.SB3Config(policy="lm_prior", kl_coef=float("nan")).validate()
    from agents.last_block import LastBlockPolicy, fitting_positions

    positions = fitting_positions("textenvs/Translate-v0", max_steps=5)
    longest = max(
        len(env.unwrapped.lm.encode(env.unwrapped.task.prompt(sample)))
        for split in ("train", "test")
        for sample in gym.make("textenvs/Translate-v0", split=split).unwrapped.samples
    )
    assert positions % 16 == 0 and longest + 5 <= positions < longest + 5 + 16
    with pytest.raises(ValueError, match="is an edit env"):
        fitting_positions("textenvs/EditSummary-v0")
    with pytest.raises(ValueError, match="obs='context', layer=-2 and candidates_obs=True"):
        LastBlockPolicy(gym.spaces.Box(-1, 1, (130,)), gym.spaces.Discrete(4), lambda _: 1e-4)
    space = policy.observation_space
    with pytest.raises(ValueError, match="needs a Discrete action space"):
        LastBlockPolicy(space, gym.spaces.Box(-1, 1, (4,)), lambda _: 1e-4)
    lm = env.unwrapped.lm
    monkeypatch.setattr(lm, "model", torch.nn.Linear(2, 2))  # a model of another layout
    with pytest.raises(ValueError, match="runs the GPT-2 block layout"):
        LastBlockPolicy(space, gym.spaces.Discrete(4), lambda _: 1e-4, model=lm)


def test_kl_penalty_reaches_the_rollout_buffer_exactly():
    """KLPenalty subtracts kl_coef * (log pi(a) - log prior_T(a)) from each collected reward, and
    what PPO stores (hence trains on) is the penalised reward."""
    pytest.importorskip("stable_baselines3")
    import torch
    from stable_baselines3.common.callbacks import BaseCallback

    from agents import sb3
    from agents.lm_prior import KLPenalty

    model = prior_model(n_epochs=1, policy_kwargs={"prior_temperature": 0.5})
    with torch.no_grad():  # move the policy away from its prior, so the KL is not zero
        model.policy.action_net.bias.copy_(torch.tensor([0.0, 1.5, -1.0, 0.5]))
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            obs = self.locals["obs_tensor"]
            prior = torch.log_softmax(obs[:, -4:].float() / 0.5, -1)
            actions = torch.as_tensor(self.locals["actions"]).long()
            prior = prior[torch.arange(len(obs)), actions]
            kl = (self.locals["log_probs"] - prior).detach().numpy()
            seen.append((self.locals["rewards"].copy(), kl))
            return True

    model.learn(8 * 2, callback=[Record(), KLPenalty(0.1), Record()])
    raw, penalised = seen[0::2], seen[1::2]  # each step: before the penalty, after it
    for (reward, kl), (penalised_reward, kl_again) in zip(raw, penalised, strict=True):
        np.testing.assert_allclose(kl, kl_again)
        np.testing.assert_allclose(penalised_reward, reward - 0.1 * kl, atol=1e-6)
    assert max(np.abs(kl).max() for _, kl in raw) > 1e-3
    stored = model.rollout_buffer.rewards  # (n_steps, n_envs) of the last rollout
    np.testing.assert_allclose(stored, np.stack([r for r, _ in penalised]), atol=1e-6)
    with pytest.raises(ValueError, match="kl_coef must be a finite number >= 0"):
        KLPenalty(-1.0)
    mlp = sb3.build(
        "textenvs/Summarize-v0", sb3.SB3Config(num_envs=2, n_steps=8, batch_size=8), max_steps=3
    )
    with pytest.raises(ValueError, match="KLPenalty reads the LM prior from an LMPriorPolicy"):
        mlp.learn(8, callback=KLPenalty(0.1))


def test_evaluating_q_learning_during_training_changes_no_training_step():
    """A learning curve's evaluations use their own tie-break generator: the table learnt with
    evaluations between chunks equals the table learnt without them."""
    from agents.qlearning import QLearning, QLearningConfig, make_tabular_env

    def learn(evaluate: bool) -> np.ndarray:
        env = make_tabular_env(
            "textenvs/Summarize-v0", "train", 4, "hash", 6, 64, 0, n_fit=64, max_steps=4
        )
        test = make_tabular_env(
            "textenvs/Summarize-v0", "test", 4, "hash", 6, 64, 0, fitted=env, max_steps=4
        )
        learner = QLearning(env, QLearningConfig(seed=0, lm_prior=0.01))
        callback = (lambda s: learner.evaluate(test, max_samples=4)) if evaluate else None
        learner.learn(400, callback=callback, callback_every=100)
        return learner.q.copy()

    np.testing.assert_array_equal(learn(False), learn(True))
