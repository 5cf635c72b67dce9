"""Third-party RL libraries on our ids through their own standard entry points, nothing adapted.

Marked ``thirdparty``: install the clients with ``pip install -e ".[thirdparty]"`` (TorchRL,
Tianshou; RLlib separately, it pins an older gymnasium) and run ``pytest -m thirdparty``. A test
skips when its library is missing. The registration hook and the SB3 entry points are covered by
the default suite (``tests/test_registration.py``, ``tests/test_registered_envs.py``).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from tests.conftest import ENV_IDS, FAST_KWARGS

pytestmark = pytest.mark.thirdparty


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_torchrl_gym_wrapper_on_the_batched_env(env_id):
    pytest.importorskip("torchrl")
    from torchrl.envs import GymWrapper
    from torchrl.envs.utils import check_env_specs

    # TorchRL takes a vector env in SameStep or Disabled autoreset mode, ours as gymnasium's own;
    # its rollout needs every info key at every step, so a terminal-only metric (IMDB's
    # classifier) is paid densely here (known limit: the key is absent mid-episode otherwise)
    kwargs = dict(FAST_KWARGS[env_id])
    if env_id == "textenvs/IMDBSentiment-v0":
        kwargs["dense"] = True
    env = GymWrapper(gym.make_vec(env_id, num_envs=2, autoreset_mode="SameStep", **kwargs))
    check_env_specs(env)
    rollout = env.rollout(6, break_when_any_done=False)
    assert rollout.batch_size == (2, 6)
    assert rollout["next", "done"].any()  # episodes ended and auto-reset inside the rollout
    assert np.isfinite(rollout["next", "reward"].numpy()).all()
    assert np.isfinite(rollout["next", "metric"].numpy()).all()


def test_torchrl_gym_env_with_worker_processes():
    """TorchRL's GymEnv(id, num_envs=N) makes the ids in async workers that never import us."""
    pytest.importorskip("torchrl")
    from torchrl.envs import GymEnv

    env = GymEnv("textenvs/Summarize-v0", num_envs=2, max_steps=2, text_infos=False)
    try:
        rollout = env.rollout(4, break_when_any_done=False)
        assert rollout.batch_size == (2, 4) and rollout["next", "done"].any()
    finally:
        env.close()


@pytest.mark.slow
def test_torchrl_imported_first_still_finds_the_ids():
    """TorchRL probes for gymnasium with find_spec before importing it; the ids still register."""
    pytest.importorskip("torchrl")
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        from torchrl.envs import GymEnv
        env = GymEnv("textenvs/Summarize-v0", max_steps=2)
        rollout = env.rollout(3, break_when_any_done=False)
        print("ok", tuple(rollout.batch_size))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok (3,)")


@pytest.mark.parametrize("env_id", ["textenvs/Summarize-v0", "textenvs/EditSummary-v0"])
def test_tianshou_dqn_trains_on_the_env(env_id):
    """Tianshou's DQN with its replay buffer's NaN check on (it refused None-valued infos)."""
    pytest.importorskip("tianshou")
    import torch
    from tianshou.algorithm.modelfree.dqn import DQN, DiscreteQLearningPolicy
    from tianshou.algorithm.optim import AdamOptimizerFactory
    from tianshou.data import Collector, VectorReplayBuffer
    from tianshou.env import DummyVectorEnv
    from tianshou.trainer import OffPolicyTrainerParams
    from tianshou.utils.net.common import Net

    from textenvs.wrappers import FlattenEditActions

    def make():
        env = gym.make(env_id, **{**FAST_KWARGS[env_id], "token_mode": "topk", "k": 4})
        return (
            FlattenEditActions(env)
            if isinstance(env.action_space, gym.spaces.MultiDiscrete)
            else env
        )

    envs = DummyVectorEnv([make, make])
    probe = make()
    space, obs_dim = probe.action_space, probe.observation_space.shape[0]
    torch.manual_seed(0)
    net = Net(state_shape=obs_dim, action_shape=int(space.n), hidden_sizes=[32])
    policy = DiscreteQLearningPolicy(model=net, action_space=space, eps_training=0.2)
    algorithm = DQN(policy=policy, optim=AdamOptimizerFactory(lr=1e-3), target_update_freq=10)
    collector = Collector(
        algorithm, envs, VectorReplayBuffer(200, len(envs)), raise_on_nan_in_buffer=True
    )
    before = [p.detach().clone() for p in net.parameters()]
    result = algorithm.run_training(
        OffPolicyTrainerParams(
            training_collector=collector,
            max_epochs=1,
            epoch_num_steps=40,
            collection_step_num_env_steps=10,
            batch_size=16,
            test_in_training=False,
            verbose=False,
            show_progress=False,
        )
    )
    assert result.timing.total_time > 0 and collector.buffer[: len(collector.buffer)].rew.size
    assert np.isfinite(collector.buffer[: len(collector.buffer)].rew).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    envs.close()


@pytest.mark.slow
def test_rllib_ppo_with_a_remote_env_runner():
    """RLlib's env runner is a fresh Ray worker process: it resolves the id with no import of ours.

    RLlib pins gymnasium 1.2; run this in an environment of its own (``pip install "ray[rllib]"``).
    """
    pytest.importorskip("ray.rllib")
    import ray
    from ray.rllib.algorithms.ppo import PPOConfig

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = (
            PPOConfig()
            .environment(
                "textenvs/Summarize-v0", env_config={"max_steps": 4, "token_mode": "topk", "k": 4}
            )
            .env_runners(num_env_runners=1, num_envs_per_env_runner=2)
            .training(train_batch_size_per_learner=64, minibatch_size=32, num_epochs=1)
        )
        algo = config.build_algo()
        results = [algo.train() for _ in range(2)]
        algo.stop()
    finally:
        ray.shutdown()
    runners = results[-1]["env_runners"]
    assert runners["num_env_steps_sampled_lifetime"] >= 128
    assert np.isfinite(runners["episode_return_mean"])
