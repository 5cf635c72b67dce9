"""gym.make and a random policy: one episode of textenvs/Summarize-v0, printed step by step.

python examples/random_policy.py --episodes 2
"""

import argparse

import gymnasium as gym


def main(argv=None):
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--env-id",
        default="textenvs/Summarize-v0",
        help="any registered id (python -m textenvs list)",
    )
    p.add_argument("--episodes", type=int, default=3, help="episodes to play")
    args = p.parse_args(argv)

    env = gym.make(args.env_id, token_mode="topk", k=8)  # action i = the LM's i-th best token
    env.action_space.seed(0)
    for episode in range(args.episodes):
        obs, info = env.reset(seed=episode)
        done, total = False, 0.0
        while not done:
            obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
            total += reward
            done = terminated or truncated
        print(f"episode {episode}: return {total:.3f}, {info['metric_name']} {info['metric']:.3f}")
        print(f"  prompt: {info['prompt'][-60:]!r}\n  text:   {info['text']!r}")
    env.close()


if __name__ == "__main__":
    main()
