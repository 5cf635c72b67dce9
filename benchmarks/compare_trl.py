"""Token-level PPO against TRL's GRPOTrainer and RLOOTrainer: equal budgets, tuned alike.

``pip install -e ".[compare]"`` then ``python -m benchmarks.compare_trl --completions 1024``.

Fair by construction, and every setting below is printed in the output's ``config``:

* **Budget.** Every trainer samples ``--completions`` completions and takes ``--completions /
  --batch`` optimizer steps, one per ``--batch`` completions. Ours: one PPO epoch, minibatch =
  batch. TRL: ``per_device_train_batch_size`` = batch, ``gradient_accumulation_steps`` =
  ``steps_per_generation`` = ``num_iterations`` = 1. Both counts are measured on every run (the
  completions the reward function scored, the optimizer's steps) and printed.
* **Tuning.** A grid of the same size for every trainer; each point trains once (seed 0) and is
  scored greedily on the validation split. The best point and the trainer's own defaults then
  train with ``--seeds`` seeds and are scored on the test split.
  - GRPO / RLOO: learning rate x KL coefficient (``beta``) x group size (``num_generations``);
    RLOO's grid runs also whiten advantages (``normalize_advantages=True``).
  - Ours: learning rate x KL coefficient x reward (dense per token, or the metric at the end).
  - Defaults: TRL's own learning rate, beta, group size, loss and advantage settings, and ours.
    The budget and the settings below stay equal.
* **Identical for all.** The same model copy, train prompts and reward metric. The reward text is
  the completion only: decoded without special tokens, ended at EOS or ``--max-new-tokens``,
  stripped of surrounding whitespace; this is exactly the env's ``info["text"]``. Sampling:
  temperature 1, no top-k / top-p. Dropout off (ours runs the model in eval mode; TRL:
  ``disable_dropout=True``). No gradient checkpointing. Learning rate decays linearly to 0 with
  no warm-up. Gradient-norm clip 1. fp32. Greedy evaluation through the same env.
* **Reported.** Per trainer and setting:
  - the test metric (mean over seeds, 95% CI);
  - the paired difference to ours at the same setting kind (best vs best, defaults vs defaults),
    per test sample and seed, with a hierarchical bootstrap CI;
  - wall seconds of the whole ``train()`` call (generation included) and completions/s.
  TRL runs on the CPU here (``use_cpu=True``) unless ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

import textenvs
from agents.common import parse_bool
from agents.token_ppo import greedy_metrics
from benchmarks.compare_common import (  # noqa: F401  (the names tests and users import from here)
    ENV_FOR_TASK,
    PAIRS,
    TRAINERS,
    CountingReward,
    grid,
    ours_config,
    reward_text,
    run_ours,
    run_result,
    run_trl,
    trl_config,
)
from benchmarks.compare_like import (  # noqa: F401
    like_config,
    like_table,
    like_trl_config,
    like_with_like,
)
from benchmarks.run import hierarchical_bootstrap
from textenvs.cli import float_arg, int_arg, run_cli
from textenvs.lm import BUILTIN_MODELS, LanguageModel
from textenvs.rewards import METRIC_NAMES
from textenvs.tasks import builtin_task


def train_one(name: str, args, point: dict | None, seed: int, split: str, samples: int, ctx: dict):
    """Train one trainer once; its greedy per-sample metrics on ``split`` and measured budget."""
    if name == "textenvs_ppo":
        config = ours_config(args, point, seed, ctx["env_id"], ctx["model"], ctx["metric"])
        trainer, _, completions, steps, wall = run_ours(config)
        lm = trainer.lm
    else:
        out = tempfile.mkdtemp(prefix=f"textenvs-{name}-")
        lm, completions, steps, wall = run_trl(
            name, trl_config(name, args, point, seed, out), ctx, args.device
        )
    metrics = greedy_metrics(lm, ctx["env_id"], split, samples, args.max_new_tokens, ctx["metric"])
    return run_result(metrics, completions, steps, wall)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: budgets every trainer meets exactly, known trainers and metric."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=list(ENV_FOR_TASK), default="summarize")
    p.add_argument("--reward", default=None, help="metric name (default: the task's)")
    p.add_argument(
        "--completions", type=int_arg(), default=1024, help="sampled completions per run"
    )
    p.add_argument("--max-new-tokens", type=int_arg(), default=12)
    p.add_argument(
        "--batch", type=int_arg(), default=32, help="completions per optimizer step (all)"
    )
    p.add_argument(
        "--seeds", type=int_arg(), default=3, help="seeds of the best point and defaults"
    )
    p.add_argument("--grid-lr", type=float_arg(0, low_open=True), nargs="+", default=[3e-4, 1e-3])
    p.add_argument("--grid-kl", type=float_arg(0), nargs="+", default=[0.0, 0.02])
    p.add_argument("--grid-group", type=int_arg(2), nargs="+", default=[4, 8], help="GRPO / RLOO")
    p.add_argument(
        "--grid-dense",
        type=parse_bool,
        nargs="+",
        default=[True, False],
        help="ours: dense per-token reward or the metric at the end",
    )
    p.add_argument("--validation-samples", type=int_arg(), default=100, help="grid scoring")
    p.add_argument("--eval-samples", type=int_arg(), default=200, help="test samples, paired")
    p.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--like-with-like",
        action="store_true",
        help="ours-GRPO against TRL's GRPOTrainer and ours-RLOO against RLOOTrainer at identical "
        "math and settings (--learning-rate, --kl-coef, --group), no grid",
    )
    p.add_argument("--algorithms", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    p.add_argument(
        "--learning-rate", type=float_arg(0, low_open=True), default=3e-4, help="--like-with-like"
    )
    p.add_argument("--kl-coef", type=float_arg(0), default=0.02, help="--like-with-like: beta")
    p.add_argument(
        "--group", type=int_arg(2), default=4, help="--like-with-like: completions a prompt"
    )
    p.add_argument(
        "--repeats",
        type=int_arg(),
        default=1,
        help="--like-with-like: run the interleaved race this many times (speed: the median over "
        "every run, with its range; quality: the first repeat)",
    )
    p.add_argument("--json-out", help="write the report (JSON) here")
    args = p.parse_args(argv)
    for name in (
        "completions",
        "max_new_tokens",
        "batch",
        "seeds",
        "eval_samples",
        "validation_samples",
        "repeats",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.completions % args.batch:
        p.error(
            f"--completions {args.completions} is not a multiple of --batch {args.batch}: every "
            "trainer must sample the same number of completions, in whole optimizer steps"
        )
    groups = [g for g in args.grid_group if g < 2 or args.batch % g]
    if groups:
        p.error(
            f"--batch {args.batch} is not a multiple of --grid-group {groups} (each >= 2): GRPO "
            "and RLOO sample whole groups of completions per prompt"
        )
    if args.like_with_like and (args.group < 2 or args.batch % args.group):
        p.error(f"--group {args.group} must be >= 2 and divide --batch {args.batch}")
    if args.like_with_like and args.kl_coef < 0:
        p.error(f"--kl-coef must be >= 0, got {args.kl_coef}")
    if len(args.grid_dense) != len(args.grid_group):
        p.error(
            f"--grid-dense has {len(args.grid_dense)} values and --grid-group "
            f"{len(args.grid_group)}: every trainer's grid must have the same size"
        )
    if args.reward is not None and args.reward not in METRIC_NAMES:
        p.error(f"unknown --reward {args.reward!r}; choose one of {', '.join(METRIC_NAMES)}")
    return args


def shared_config(args, metric: str) -> dict:
    """The settings every trainer shares, as the output states them."""
    return {
        "task": args.task,
        "metric": metric,
        "completions_per_run": args.completions,
        "completions_per_optimizer_step": args.batch,
        "optimizer_steps_per_run": args.completions // args.batch,
        "max_new_tokens": args.max_new_tokens,
        "sampling": "temperature 1.0, top_k off, top_p 1.0, ends at EOS or max_new_tokens",
        "reward_text": "the completion only, decoded without special tokens, whitespace-stripped",
        "dropout": "off",
        "gradient_checkpointing": "off",
        "lr_schedule": "linear to 0, no warm-up",
        "max_grad_norm": 1.0,
        "precision": "fp32",
        "grid": {name: grid(args, name) for name in args.trainers},
        "grid_scoring": f"seed 0, first {args.validation_samples} validation samples, greedy",
        "test": f"{args.seeds} seeds x first {args.eval_samples} test samples, greedy, paired",
        "trl_defaults_kept": "learning_rate, beta, num_generations, loss_type, scale_rewards, "
        "normalize_advantages (the defaults rows)",
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    metric = args.reward or builtin_task(args.task).default_reward
    env_id = ENV_FOR_TASK[args.task]
    model_dir = tempfile.mkdtemp(prefix="textenvs-tiny-")
    shutil.copytree(BUILTIN_MODELS[textenvs.TINY], model_dir, dirs_exist_ok=True)  # TRL reloads
    ctx = {"env_id": env_id, "model": model_dir, "metric": metric}
    if args.like_with_like or set(args.trainers) - {"textenvs_ppo"}:  # TRL's train prompts, once
        from datasets import Dataset

        task = builtin_task(args.task)
        ctx["train_dataset"] = Dataset.from_list(
            [
                {"prompt": task.prompt(s), "references": list(s.references)}
                for s in task.split("train")
            ]
        )
    before = greedy_metrics(
        LanguageModel(model_dir, device=args.device),
        env_id,
        "test",
        args.eval_samples,
        args.max_new_tokens,
        metric,
    )
    if args.like_with_like:
        config = {k: v for k, v in shared_config(args, metric).items() if not k.startswith("grid")}
        config.update(
            learning_rate=args.learning_rate,
            beta=args.kl_coef,
            group=args.group,
            num_epochs=1,
            reward="the metric of the finished completion (terminal)",
            grpo="loss_type bnpo, scale_rewards group, k3 KL in the loss",
            rloo="k1 KL summed per completion in the reward, sequence-level ratio, "
            "normalize_advantages off",
            adam_epsilon=1e-5,
        )
        config.pop("trl_defaults_kept", None)
        report = {
            "config": config,
            "test_metric_before": float(np.mean(before)),
            "like_with_like": like_with_like(args, ctx),
        }
        shutil.rmtree(model_dir, ignore_errors=True)
        print(like_table(report["like_with_like"]))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=1))
        return report
    report = {
        "config": shared_config(args, metric),
        "test_metric_before": float(np.mean(before)),
        "trainers": {},
    }
    for name in args.trainers:
        points, searched = grid(args, name), []
        for point in points:
            run = train_one(name, args, point, 0, "validation", args.validation_samples, ctx)
            searched.append({**point, **{k: v for k, v in run.items() if k != "metrics"}})
            print(json.dumps({name: searched[-1]}), flush=True)
        best = points[int(np.argmax([s["mean"] for s in searched]))]
        rows = {}
        for setting, point in (("best", best), ("defaults", None)):
            runs = [
                train_one(name, args, point, seed, "test", args.eval_samples, ctx)
                for seed in range(args.seeds)
            ]
            rows[setting] = {"point": point or "defaults", "runs": runs}
            print(json.dumps({name: setting, "means": [r["mean"] for r in runs]}), flush=True)
        report["trainers"][name] = {"grid": searched, **rows}
    shutil.rmtree(model_dir, ignore_errors=True)
    summarise(report)
    print(json.dumps(report_without_metrics(report)))
    print(table(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    return report


def summarise(report: dict) -> None:
    """Add to every row its mean, CI, budget and speed, and the paired difference to ours."""
    trainers = report["trainers"]
    for name, rows in trainers.items():
        for setting in ("best", "defaults"):
            row = rows[setting]
            per_seed = [r["metrics"] for r in row["runs"]]
            mean, lo, hi = hierarchical_bootstrap(per_seed)
            row.update(
                test_metric=mean,
                test_ci=[lo, hi],
                completions=[r["completions"] for r in row["runs"]],
                optimizer_steps=[r["optimizer_steps"] for r in row["runs"]],
                wall_s=float(np.mean([r["wall_s"] for r in row["runs"]])),
                completions_per_s=float(np.mean([r["completions_per_s"] for r in row["runs"]])),
            )
            ours = trainers.get("textenvs_ppo", {}).get(setting)
            if ours is not None and name != "textenvs_ppo":
                diffs = [
                    np.asarray(a["metrics"]) - np.asarray(b["metrics"])
                    for a, b in zip(row["runs"], ours["runs"])
                ]
                d, dlo, dhi = hierarchical_bootstrap(diffs)
                row.update(minus_ours=d, minus_ours_ci=[dlo, dhi])


def report_without_metrics(report: dict) -> dict:
    """The report without the per-sample lists (for the printed JSON line)."""
    out = json.loads(json.dumps(report))
    for rows in out["trainers"].values():
        for setting in ("best", "defaults"):
            for run in rows[setting]["runs"]:
                run.pop("metrics", None)
    return out


def table(report: dict) -> str:
    """The Markdown table of the README."""
    lines = [
        "| trainer | setting | learning rate, KL, group / reward | completions | optimizer steps "
        "| test metric (95% CI) | minus ours (95% CI) | train() wall s | completions/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in report["trainers"].items():
        for setting in ("best", "defaults"):
            row = rows[setting]
            point = row["point"]
            hyper = (
                "defaults"
                if point == "defaults"
                else f"{point['learning_rate']:g}, {point['kl_coef']:g}, "
                + (
                    f"group {point['group']}"
                    if "group" in point
                    else ("dense" if point["dense"] else "terminal")
                )
            )
            diff = (
                f"{row['minus_ours']:+.3f} ({row['minus_ours_ci'][0]:+.3f}, "
                f"{row['minus_ours_ci'][1]:+.3f})"
                if "minus_ours" in row
                else "-"
            )
            lines.append(
                f"| {name} | {setting} | {hyper} | {sorted(set(row['completions']))} "
                f"| {sorted(set(row['optimizer_steps']))} | {row['test_metric']:.3f} "
                f"({row['test_ci'][0]:.3f}, {row['test_ci'][1]:.3f}) | {diff} "
                f"| {row['wall_s']:.1f} | {row['completions_per_s']:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)  # a user error as one line, "error: ...", exit status 2
