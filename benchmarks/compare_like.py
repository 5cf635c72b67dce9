"""``benchmarks.compare_trl --like-with-like``: our GRPO / RLOO against TRL's at identical math
(the same group size, loss, KL placement and coefficient, learning rate, completions and optimizer
steps): the metric difference, the speed ratio and where the time goes."""

from __future__ import annotations

import json
import tempfile

import numpy as np

from agents.token_ppo import TokenPPOConfig, greedy_metrics
from benchmarks.compare_common import (
    PAIRS,
    Stopwatch,
    run_ours,
    run_result,
    run_trl,
    trl_config,
)
from benchmarks.run import hierarchical_bootstrap


def like_config(algorithm: str, args, seed: int, env_id: str, model: str, metric: str):
    """Our GRPO / RLOO with TRL's math for the same algorithm (``--like-with-like``).

    GRPO as TRL's ``GRPOTrainer`` with ``loss_type="bnpo"``, ``scale_rewards="group"``: the
    completion's reward (the metric at the end) normalised within its group, one ratio per token,
    the loss averaged over the batch's tokens, ``beta`` times the k3 KL of the current policy in the
    loss. RLOO as TRL's ``RLOOTrainer``: the reward minus ``beta`` times the completion's summed k1
    KL, the leave-one-out baseline, one ratio per completion, the loss averaged over completions.
    """
    math = {
        "grpo": dict(kl_placement="loss", kl_estimator="k3", ratio_level="token"),
        "rloo": dict(kl_placement="reward", kl_estimator="k1", ratio_level="sequence"),
    }[algorithm]
    return TokenPPOConfig(
        env_id=env_id,
        model=model,
        reward=metric,
        dense=False,  # TRL scores the finished completion
        estimator=algorithm,
        group_size=args.group,
        num_envs=args.batch,
        minibatch_size=args.batch,
        num_epochs=1,
        max_new_tokens=args.max_new_tokens,
        total_episodes=args.completions,
        learning_rate=args.learning_rate,
        kl_coef=args.kl_coef,
        temperature=1.0,
        device=args.device,
        seed=seed,
        **math,
    )


def like_trl_config(algorithm: str, args, seed: int, out: str):
    """TRL's config at the same math as :func:`like_config`."""
    config = trl_config(
        algorithm,
        args,
        {"learning_rate": args.learning_rate, "kl_coef": args.kl_coef, "group": args.group},
        seed,
        out,
    )
    config.adam_epsilon = 1e-5  # ours; AdamW with TRL's weight_decay 0 is our Adam
    if algorithm == "grpo":
        config.loss_type, config.scale_rewards = "bnpo", "group"
    else:
        config.normalize_advantages = False
    return config


def train_like(name: str, args, seed: int, ctx: dict) -> dict:
    """One run of ours or TRL's at the like-with-like settings; test metrics, budget, speed and
    where the time went."""
    algorithm = name.removeprefix("textenvs_")
    if name.startswith("textenvs_"):
        config = like_config(algorithm, args, seed, ctx["env_id"], ctx["model"], ctx["metric"])
        trainer, history, completions, steps, wall = run_ours(config)
        split = {k: sum(h[k] for h in history) for k in ("rollout_s", "reference_s", "update_s")}
        lm = trainer.lm
    else:
        watch = {}
        trl_args = like_trl_config(
            algorithm, args, seed, tempfile.mkdtemp(prefix=f"textenvs-{name}-")
        )
        lm, completions, steps, wall = run_trl(
            name,
            trl_args,
            ctx,
            args.device,
            lambda t: watch.setdefault("g", Stopwatch(t, "_generate_and_score_completions")),
        )
        split = {  # TRL computes the reference log-probs inside its generation step
            "generation_reward_reference_s": watch["g"].seconds,
            "update_and_rest_s": wall - watch["g"].seconds,
        }
    metrics = greedy_metrics(
        lm, ctx["env_id"], "test", args.eval_samples, args.max_new_tokens, ctx["metric"]
    )
    return {
        **run_result(metrics, completions, steps, wall),
        "time_split_s": {k: round(v, 2) for k, v in split.items()},
    }


def like_with_like(args, ctx: dict) -> dict:
    """Each algorithm: ours and TRL's at identical settings, interleaved seed by seed (the side
    that goes first alternates, so a change of the machine's load lands on both), the whole race
    ``--repeats`` times. Quality: the first repeat, paired by seed and test sample (the metric
    difference with its CI). Speed: every run; the median completions/s per side with its range,
    and the median of the per-seed ratios ours / TRL with its range."""
    report = {}
    for algorithm in args.algorithms:
        ours_name, trl_name = PAIRS[algorithm]
        runs: dict[str, list[dict]] = {ours_name: [], trl_name: []}  # first repeat, by seed
        speeds: dict[str, list[float]] = {ours_name: [], trl_name: []}
        ratios = []
        for repeat in range(args.repeats):
            for seed in range(args.seeds):
                first = (seed + repeat) % 2 == 0
                order = (ours_name, trl_name) if first else (trl_name, ours_name)
                pair = {name: train_like(name, args, seed, ctx) for name in order}
                for name in order:
                    speeds[name].append(pair[name]["completions_per_s"])
                    if repeat == 0:
                        runs[name].append(pair[name])
                ratios.append(
                    pair[ours_name]["completions_per_s"] / pair[trl_name]["completions_per_s"]
                )
                print(
                    json.dumps(
                        {"algorithm": algorithm, "repeat": repeat, "seed": seed, "order": order}
                        | {n: [pair[n]["mean"], pair[n]["completions_per_s"]] for n in order}
                    ),
                    flush=True,
                )
        ours, theirs = runs[ours_name], runs[trl_name]
        diff, lo, hi = hierarchical_bootstrap(
            [np.asarray(a["metrics"]) - np.asarray(b["metrics"]) for a, b in zip(ours, theirs)]
        )
        rows = {}
        for name, rs in runs.items():
            mean, rlo, rhi = hierarchical_bootstrap([r["metrics"] for r in rs])
            split_keys = rs[0]["time_split_s"]
            rows[name] = {
                "runs": rs,
                "test_metric": mean,
                "test_ci": [rlo, rhi],
                "completions": [r["completions"] for r in rs],
                "optimizer_steps": [r["optimizer_steps"] for r in rs],
                "completions_per_s": float(np.median(speeds[name])),
                "completions_per_s_range": [min(speeds[name]), max(speeds[name])],
                "completions_per_s_runs": speeds[name],
                "time_split_s": {
                    k: float(np.mean([r["time_split_s"][k] for r in rs])) for k in split_keys
                },
            }
        report[algorithm] = {
            **rows,
            "ours_minus_trl": diff,
            "ours_minus_trl_ci": [lo, hi],
            "metric_equal_within_ci": lo <= 0 <= hi,
            "speed_ratio": float(np.median(ratios)),
            "speed_ratio_range": [min(ratios), max(ratios)],
            "speed_ratios": ratios,
        }
    return report


def like_table(report: dict) -> str:
    lines = [
        "| algorithm | trainer | completions | optimizer steps | test metric (95% CI) "
        "| ours - TRL (95% CI) | completions/s, median (range) | time split (s per run) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for algorithm, row in report.items():
        for name in PAIRS[algorithm]:
            r = row[name]
            diff = (
                f"{row['ours_minus_trl']:+.4f} ({row['ours_minus_trl_ci'][0]:+.4f}, "
                f"{row['ours_minus_trl_ci'][1]:+.4f})"
                if name.startswith("textenvs_")
                else f"speed ratio {row['speed_ratio']:.2f}x (median; "
                f"{row['speed_ratio_range'][0]:.2f}-{row['speed_ratio_range'][1]:.2f})"
            )
            split = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in r["time_split_s"].items())
            lines.append(
                f"| {algorithm} | {name} | {sorted(set(r['completions']))} "
                f"| {sorted(set(r['optimizer_steps']))} | {r['test_metric']:.4f} "
                f"({r['test_ci'][0]:.4f}, {r['test_ci'][1]:.4f}) | {diff} "
                f"| {r['completions_per_s']:.1f} ({r['completions_per_s_range'][0]:.1f}-"
                f"{r['completions_per_s_range'][1]:.1f}) | {split} |"
            )
    return "\n".join(lines)
