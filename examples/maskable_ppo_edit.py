"""sb3-contrib's MaskablePPO on an edit env: insert / delete / replace tokens of the LM's draft,
only valid edits sampled (``action_masks()``).

    python examples/maskable_ppo_edit.py --total-steps 2048
"""

import argparse

import gymnasium as gym
from sb3_contrib import MaskablePPO

from textenvs.vector import as_sb3_vec_env


def main(argv=None):
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--total-steps", type=int, default=2048, help="MaskablePPO training steps")
    args = p.parse_args(argv)

    # flat_actions: one Discrete action per (op, position, token) with an exact mask
    envs = gym.make_vec(
        "textenvs/EditSummary-v0", num_envs=4, flat_actions=True, k=4, max_len=16, max_steps=4
    )
    model = MaskablePPO("MlpPolicy", as_sb3_vec_env(envs), n_steps=32, batch_size=64, seed=0)
    model.learn(args.total_steps)

    env = gym.make(
        "textenvs/EditSummary-v0", split="test", flat_actions=True, k=4, max_len=16, max_steps=4
    )
    obs, info = env.reset(seed=0)
    print(f"draft:  {info['text']!r}")
    done = False
    while not done:
        mask = env.unwrapped.action_masks()
        action, _ = model.predict(obs, action_masks=mask, deterministic=True)
        obs, reward, terminated, truncated, info = env.step(int(action))
        done = terminated or truncated
    print(f"edited: {info['text']!r} ({info['metric_name']} {info['metric']:.3f})")


if __name__ == "__main__":
    main()
