"""Stable-Baselines3 PPO on a batched textenvs vector env (one LM forward per step for all
sub-envs), evaluated on the test split.

    python examples/sb3_ppo.py --total-steps 4096
"""

import argparse

import gymnasium as gym
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecMonitor

from textenvs.vector import as_sb3_vec_env


def main(argv=None):
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--total-steps", type=int, default=4096, help="PPO training steps")
    p.add_argument("--eval-episodes", type=int, default=16, help="test episodes after training")
    args = p.parse_args(argv)

    kwargs = dict(token_mode="topk", k=4, max_steps=8)
    venv = VecMonitor(as_sb3_vec_env(gym.make_vec("textenvs/Summarize-v0", num_envs=8, **kwargs)))
    model = PPO("MlpPolicy", venv, n_steps=32, batch_size=64, seed=0, verbose=0)
    model.learn(args.total_steps)

    env = gym.make("textenvs/Summarize-v0", split="test", **kwargs)
    metrics = []
    for i in range(args.eval_episodes):
        obs, info = env.reset(seed=i, options={"index": i})
        done = False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, info = env.step(int(action))
            done = terminated or truncated
        metrics.append(info["metric"])
    print(f"PPO after {args.total_steps} steps: test ROUGE-L {sum(metrics) / len(metrics):.4f}")


if __name__ == "__main__":
    main()
