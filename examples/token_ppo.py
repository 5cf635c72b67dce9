"""Token-level PPO: the language model itself is the policy (value head, frozen reference, KL
penalty), trained on the env's metric and evaluated by greedy decoding on the test split.

    python examples/token_ppo.py --total-episodes 256
"""

import argparse

from agents.token_ppo import TokenPPO, TokenPPOConfig


def main(argv=None):
    p = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--total-episodes", type=int, default=256, help="training episodes")
    p.add_argument(
        "--eval-samples",
        type=int,
        default=32,
        help="test samples of the greedy evaluation before and after",
    )
    args = p.parse_args(argv)

    config = TokenPPOConfig(
        env_id="textenvs/Summarize-v0",  # any generation id; model="gpt2" or a folder for yours
        total_episodes=args.total_episodes,
        num_envs=16,
        max_new_tokens=8,
        temperature=0.5,
        gae_lambda=0.5,
        eval_samples=args.eval_samples,
        seed=0,
    )
    trainer = TokenPPO(config)
    before = trainer.evaluate("test", args.eval_samples)
    trainer.train(progress=False)
    after = trainer.evaluate("test", args.eval_samples)
    print(
        f"greedy test ROUGE-L: {before:.4f} before, {after:.4f} after "
        f"{args.total_episodes} episodes"
    )


if __name__ == "__main__":
    main()
