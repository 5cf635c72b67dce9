"""Each token-level estimator tuned on its own grid, at an equal budget, on the validation split.

The suite's token agents share settings tuned on PPO alone. Here every estimator gets its own
small grid of learning rates, at the same number of episodes and the same distinct prompts per
batch (PPO: 32 episodes of 32 prompts; GRPO and RLOO: 32 prompts x ``group_size`` completions,
so the same 4 epochs of minibatches of 16 make as many gradient steps per episode). The settings
are chosen by the greedy metric on the first ``--validation-samples`` samples of the validation
split (never the test split, which the suite's table reports), mean over ``--seeds`` seeds.

    python -m benchmarks.estimator_grid --out benchmarks/latest/estimator_grid.json

Prints and writes JSON: the untrained LM's greedy validation metric (the starting point), every
run's validation metric, each estimator's mean per learning rate and its chosen rate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np

from benchmarks.suite.settings import TOKEN_GROUP_SIZE, TOKEN_PPO
from textenvs.cli import float_arg, int_arg, run_cli

# the estimators compared: (estimator, group_credit)
VARIANTS = {
    "ppo": ("gae", "episode"),
    "grpo": ("grpo", "episode"),
    "rloo": ("rloo", "episode"),
    "grpo_to_go": ("grpo", "to_go"),
    "rloo_to_go": ("rloo", "to_go"),
}
PROMPTS_PER_BATCH = 32


def variant_config(variant: str, learning_rate: float, seed: int, args) -> dict:
    """The :class:`~agents.token_ppo.TokenPPOConfig` fields of one run: the suite's token
    settings with this estimator, learning rate and seed, 32 distinct prompts per batch."""
    estimator, credit = VARIANTS[variant]
    grouped = estimator != "gae"
    return {
        **TOKEN_PPO,
        "env_id": args.env_id,
        "estimator": estimator,
        "group_credit": credit,
        "group_size": TOKEN_GROUP_SIZE,
        "num_envs": PROMPTS_PER_BATCH * (TOKEN_GROUP_SIZE if grouped else 1),
        "learning_rate": learning_rate,
        "total_episodes": args.episodes,
        "max_new_tokens": args.max_new_tokens,
        "env_kwargs": {"token_mode": "topk", "k": 8},  # the suite's env settings
        "seed": seed,
    }


def run_one(job: tuple) -> dict:
    """Train one run and measure its greedy validation metric (one torch thread)."""
    import torch

    from agents.token_ppo import TokenPPO, TokenPPOConfig

    torch.set_num_threads(1)
    variant, learning_rate, seed, args = job
    start = time.time()
    trainer = TokenPPO(TokenPPOConfig(**variant_config(variant, learning_rate, seed, args)))
    history = trainer.train(progress=False)
    metric = trainer.evaluate("validation", args.validation_samples)
    return {
        "variant": variant,
        "learning_rate": learning_rate,
        "seed": seed,
        "validation_metric": metric,
        "final_kl": history[-1]["kl"],
        "wall_s": round(time.time() - start, 1),
    }


def greedy_validation(args) -> float:
    """The starting point: greedy decoding of the untrained LM on the same validation samples."""
    from agents.common import greedy_metric
    from agents.token_ppo import TokenPPOConfig
    from textenvs.lm import shared_model

    config = TokenPPOConfig(**variant_config("ppo", 1.0, 0, args))  # the runs' model and env
    return greedy_metric(
        shared_model(config.model), args.env_id, "validation", args.validation_samples,
        args.max_new_tokens, env_kwargs=config.env_kwargs,
    )  # fmt: skip


def summary(runs: list[dict]) -> dict:
    """Each variant's mean validation metric per learning rate and the rate chosen (the best
    mean)."""
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        means = {}
        for lr in sorted({r["learning_rate"] for r in runs if r["variant"] == variant}):
            values = [
                r["validation_metric"]
                for r in runs
                if r["variant"] == variant and r["learning_rate"] == lr
            ]
            means[repr(lr)] = float(np.mean(values))
        best = max(means, key=means.get)
        out[variant] = {"mean_by_learning_rate": means, "chosen_learning_rate": float(best)}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.estimator_grid",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--env-id", default="textenvs/Summarize-v0")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=tuple(VARIANTS))
    p.add_argument(
        "--learning-rates", nargs="+", type=float_arg(0, low_open=True), default=[1e-4, 3e-4, 1e-3]
    )
    p.add_argument("--seeds", type=int_arg(), default=2)
    p.add_argument("--episodes", type=int_arg(), default=768, help="per run (the main job's)")
    p.add_argument("--max-new-tokens", type=int_arg(), default=8, help="the suite's horizon")
    p.add_argument("--validation-samples", type=int_arg(), default=200)
    p.add_argument("--jobs", type=int_arg(), default=2, help="runs at once, one thread each")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    jobs = [
        (variant, lr, seed, args)
        for variant, lr, seed in itertools.product(
            args.variants, args.learning_rates, range(args.seeds)
        )
    ]
    start = time.time()
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        runs = pool.map(run_one, jobs, chunksize=1)
    report = {
        "env_id": args.env_id,
        "episodes": args.episodes,
        "prompts_per_batch": PROMPTS_PER_BATCH,
        "group_size": TOKEN_GROUP_SIZE,
        "split": "validation",
        "validation_samples": args.validation_samples,
        "shared_settings": TOKEN_PPO,
        "greedy_validation_metric": greedy_validation(args),
        "runs": runs,
        "summary": summary(runs),
        "wall_s": round(time.time() - start, 1),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    run_cli(main)
