"""Tianshou's DQN on textenvs/Summarize-v0 in top-k mode (the action picks one of the LM's k most
likely tokens), with its replay buffer's NaN check on.

    pip install -e ".[thirdparty]"
    python examples/tianshou_dqn.py --epoch-steps 200
"""

import argparse

import gymnasium as gym
import numpy as np
import torch
from tianshou.algorithm.modelfree.dqn import DQN, DiscreteQLearningPolicy
from tianshou.algorithm.optim import AdamOptimizerFactory
from tianshou.data import Collector, VectorReplayBuffer
from tianshou.env import DummyVectorEnv
from tianshou.trainer import OffPolicyTrainerParams
from tianshou.utils.net.common import Net


def make():
    return gym.make("textenvs/Summarize-v0", token_mode="topk", k=4, max_steps=8)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epoch-steps", type=int, default=200, help="env steps per training epoch")
    p.add_argument("--epochs", type=int, default=1, help="training epochs")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    envs = DummyVectorEnv([make, make])
    probe = make()
    net = Net(
        state_shape=probe.observation_space.shape[0],
        action_shape=int(probe.action_space.n),
        hidden_sizes=[64],
    )
    policy = DiscreteQLearningPolicy(model=net, action_space=probe.action_space, eps_training=0.2)
    algorithm = DQN(policy=policy, optim=AdamOptimizerFactory(lr=1e-3), target_update_freq=20)
    collector = Collector(
        algorithm, envs, VectorReplayBuffer(1000, len(envs)), raise_on_nan_in_buffer=True
    )
    algorithm.run_training(
        OffPolicyTrainerParams(
            training_collector=collector,
            max_epochs=args.epochs,
            epoch_num_steps=args.epoch_steps,
            collection_step_num_env_steps=10,
            batch_size=32,
            test_in_training=False,
            verbose=False,
            show_progress=False,
        )
    )
    rewards = collector.buffer[: len(collector.buffer)].rew
    print(f"{len(rewards)} transitions collected, mean reward {np.mean(rewards):.4f}")
    envs.close()


if __name__ == "__main__":
    main()
