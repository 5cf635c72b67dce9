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
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import textenvs
from agents.common import parse_bool
from agents.token_ppo import TokenPPO, TokenPPOConfig, greedy_metrics
from benchmarks.run import hierarchical_bootstrap
from textenvs.cli import float_arg, int_arg, run_cli
from textenvs.lm import BUILTIN_MODELS, LanguageModel
from textenvs.rewards import METRIC_NAMES, get_metric
from textenvs.tasks import builtin_task

ENV_FOR_TASK = {"summarize": "textenvs/Summarize-v0", "translate": "textenvs/Translate-v0"}
TRAINERS = ("textenvs_ppo", "grpo", "rloo")
# --like-with-like: ours and TRL's at identical math, one pair per algorithm
PAIRS = {"grpo": ("textenvs_grpo", "grpo"), "rloo": ("textenvs_rloo", "rloo")}
OURS_DEFAULTS = {"learning_rate": 3e-4, "kl_coef": 0.02, "dense": True}


def reward_text(completion: str) -> str:
    """What every trainer's reward scores: the env's ``info["text"]`` rule."""
    return completion.strip()


class CountingReward:
    """The textenvs metric as a TRL reward function over the dataset's ``references`` column,
    counting the completions it scores (the measured completion budget).
    """

    def __init__(self, metric_name: str) -> None:
        self.metric, self.scored = get_metric(metric_name), 0
        self.__name__ = metric_name

    def __call__(self, completions, references, **kwargs) -> list[float]:
        self.scored += len(completions)
        return [self.metric(reward_text(c), refs) for c, refs in zip(completions, references)]


def grid(args: argparse.Namespace, trainer: str) -> list[dict]:
    """The documented grid of one trainer: the same number of points for every trainer."""
    third = ("dense", args.grid_dense) if trainer == "textenvs_ppo" else ("group", args.grid_group)
    return [
        {"learning_rate": lr, "kl_coef": kl, third[0]: value}
        for lr, kl, value in itertools.product(args.grid_lr, args.grid_kl, third[1])
    ]


def trl_config(kind: str, args: argparse.Namespace, point: dict | None, seed: int, out: str):
    """TRL's config for a grid point (None: TRL's defaults) at this comparison's budget."""
    from trl import GRPOConfig, RLOOConfig

    kw = dict(
        output_dir=out,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_steps=args.completions // args.batch,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        disable_dropout=True,
        gradient_checkpointing=False,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        use_cpu=args.device == "cpu",
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, args.completions // args.batch),
        seed=seed,
    )
    if point is not None:
        kw.update(
            learning_rate=point["learning_rate"],
            beta=point["kl_coef"],
            num_generations=point["group"],
        )
        if kind == "rloo":
            kw["normalize_advantages"] = True
    return (GRPOConfig if kind == "grpo" else RLOOConfig)(**kw)


def ours_config(args, point: dict | None, seed: int, env_id: str, model: str, metric: str):
    """Our config for a grid point (None: our defaults) at this comparison's budget."""
    point = point or OURS_DEFAULTS
    return TokenPPOConfig(
        env_id=env_id,
        model=model,
        reward=metric,
        dense=point["dense"],
        num_envs=args.batch,
        minibatch_size=args.batch,  # one optimizer step per batch of completions, as TRL
        num_epochs=1,
        max_new_tokens=args.max_new_tokens,
        total_episodes=args.completions,
        learning_rate=point["learning_rate"],
        kl_coef=point["kl_coef"],
        temperature=1.0,
        device=args.device,
        seed=seed,
    )


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


class Stopwatch:
    """Seconds spent inside one method of an object (patched on the instance)."""

    def __init__(self, obj, name: str) -> None:
        self.seconds, method = 0.0, getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.time()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.time() - start

        setattr(obj, name, timed)


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
    """Each algorithm: ours and TRL's at identical settings, ``--seeds`` seeds each, paired by
    seed and test sample; the metric difference with its CI and the speed ratio."""
    report = {}
    for algorithm in args.algorithms:
        ours_name, trl_name = PAIRS[algorithm]
        runs = {}
        for name in (ours_name, trl_name):
            runs[name] = [train_like(name, args, seed, ctx) for seed in range(args.seeds)]
            print(json.dumps({name: [r["mean"] for r in runs[name]]}), flush=True)
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
                "completions_per_s": float(np.mean([r["completions_per_s"] for r in rs])),
                "time_split_s": {
                    k: float(np.mean([r["time_split_s"][k] for r in rs])) for k in split_keys
                },
            }
        report[algorithm] = {
            **rows,
            "ours_minus_trl": diff,
            "ours_minus_trl_ci": [lo, hi],
            "metric_equal_within_ci": lo <= 0 <= hi,
            "speed_ratio": rows[ours_name]["completions_per_s"]
            / rows[trl_name]["completions_per_s"],
        }
    return report


def like_table(report: dict) -> str:
    lines = [
        "| algorithm | trainer | completions | optimizer steps | test metric (95% CI) "
        "| ours - TRL (95% CI) | completions/s | time split (s per run) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for algorithm, row in report.items():
        for name in PAIRS[algorithm]:
            r = row[name]
            diff = (
                f"{row['ours_minus_trl']:+.4f} ({row['ours_minus_trl_ci'][0]:+.4f}, "
                f"{row['ours_minus_trl_ci'][1]:+.4f})"
                if name.startswith("textenvs_")
                else f"speed ratio {row['speed_ratio']:.2f}x"
            )
            split = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in r["time_split_s"].items())
            lines.append(
                f"| {algorithm} | {name} | {sorted(set(r['completions']))} "
                f"| {sorted(set(r['optimizer_steps']))} | {r['test_metric']:.4f} "
                f"({r['test_ci'][0]:.4f}, {r['test_ci'][1]:.4f}) | {diff} "
                f"| {r['completions_per_s']:.1f} | {split} |"
            )
    return "\n".join(lines)


def run_ours(config: TokenPPOConfig):
    """Train our token trainer; returns it, its training history, the completions it sampled, its
    optimizer steps (counted by a hook on the optimizer) and the wall seconds of ``train()``."""
    trainer = TokenPPO(config)
    steps = [0]
    trainer.optimizer.register_step_post_hook(lambda *a: steps.__setitem__(0, steps[0] + 1))
    start = time.time()
    history = trainer.train(progress=False)
    wall = time.time() - start
    return trainer, history, trainer.iteration * trainer.episodes_per_iteration, steps[0], wall


def run_trl(name: str, trl_args, ctx: dict, device: str, on_trainer=None):
    """Train TRL's ``GRPOTrainer`` / ``RLOOTrainer`` on the shared prompts and reward; returns the
    trained model (as our LanguageModel), the completions its reward scored, its optimizer steps
    and the wall seconds of ``train()``. ``on_trainer(trainer)`` runs before training."""
    from trl import GRPOTrainer, RLOOTrainer

    reward = CountingReward(ctx["metric"])
    trainer = (GRPOTrainer if name == "grpo" else RLOOTrainer)(
        model=ctx["model"],
        reward_funcs=reward,
        args=trl_args,
        train_dataset=ctx["train_dataset"],
    )
    if on_trainer is not None:
        on_trainer(trainer)
    start = time.time()
    trainer.train()
    wall = time.time() - start
    final = str(Path(trl_args.output_dir) / "final")
    trainer.save_model(final)
    lm = LanguageModel(final, device=device)
    shutil.rmtree(trl_args.output_dir, ignore_errors=True)
    return lm, reward.scored, trainer.state.global_step, wall


def run_result(metrics: list[float], completions: int, steps: int, wall: float) -> dict:
    """One run's record: per-sample test metrics, the measured budget and the speed."""
    return {
        "metrics": metrics,
        "mean": float(np.mean(metrics)),
        "completions": completions,
        "optimizer_steps": steps,
        "wall_s": round(wall, 2),
        "completions_per_s": round(completions / wall, 2),
    }


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
    p.add_argument("--json-out", help="write the report (JSON) here")
    args = p.parse_args(argv)
    for name in (
        "completions",
        "max_new_tokens",
        "batch",
        "seeds",
        "eval_samples",
        "validation_samples",
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
