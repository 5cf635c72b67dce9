"""TorchRL on a batched textenvs vector env: its GymWrapper, its spec check and a rollout.

pip install -e ".[thirdparty]"
python examples/torchrl_rollout.py --steps 8
"""

import argparse

import gymnasium as gym
from torchrl.envs import GymWrapper
from torchrl.envs.utils import check_env_specs


def main(argv=None):
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=8, help="rollout steps")
    args = p.parse_args(argv)

    # TorchRL takes vector envs in SameStep (or Disabled) autoreset mode, gymnasium's own too
    envs = gym.make_vec(
        "textenvs/Summarize-v0",
        num_envs=4,
        token_mode="topk",
        k=4,
        max_steps=4,
        autoreset_mode="SameStep",
    )
    env = GymWrapper(envs)
    check_env_specs(env)
    rollout = env.rollout(args.steps, break_when_any_done=False)  # a random policy
    print(rollout)
    print("mean reward", rollout["next", "reward"].mean().item())


if __name__ == "__main__":
    main()
