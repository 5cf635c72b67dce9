"""Token-level PPO against TRL's GRPOTrainer and RLOOTrainer on the same model, reward and budget.

``pip install -e ".[compare]"`` then ``python -m benchmarks.compare_trl --completions 1024``.

All three start from the same model (the built-in tiny LM, saved to a folder first because TRL
reloads its reference model from one), optimise the same reward function from
:mod:`textenvs.rewards` on the same train-split prompts, and sample the same number of completions
of at most ``--max-new-tokens`` tokens. It prints one JSON object with, for each trainer, the
greedy test-split metric before and after, completions per second over the whole training, and
wall time. TRL runs on the CPU here (``use_cpu=True``) unless ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import textenvs
from agents.token_ppo import TokenPPO, TokenPPOConfig, greedy_metric
from textenvs.lm import BUILTIN_MODELS, LanguageModel
from textenvs.rewards import METRIC_NAMES, get_metric
from textenvs.tasks import builtin_task

ENV_FOR_TASK = {"summarize": "textenvs/Summarize-v0", "translate": "textenvs/Translate-v0"}


def trl_reward(metric_name: str):
    """The textenvs metric as a TRL reward function over the dataset's ``references`` column."""
    metric = get_metric(metric_name)

    def reward(completions, references, **kwargs):
        return [metric(c.split("\n")[0].strip(), refs) for c, refs in zip(completions, references)]

    reward.__name__ = metric_name
    return reward


def run_trl(kind: str, model_dir: str, args: argparse.Namespace, metric_name: str) -> dict:
    from datasets import Dataset

    if kind == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    task = builtin_task(args.task)
    train = task.split("train")
    dataset = Dataset.from_list(
        [{"prompt": task.prompt(s), "references": list(s.references)} for s in train]
    )
    batch = args.batch  # completions per optimisation step = per_device_train_batch_size
    out = tempfile.mkdtemp(prefix=f"textenvs-{kind}-")
    config = Config(
        output_dir=out,
        per_device_train_batch_size=batch,
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        max_steps=max(1, args.completions // batch),
        learning_rate=args.learning_rate,
        beta=args.kl_coef,
        temperature=1.0,
        use_cpu=args.device == "cpu",
        report_to="none",
        logging_steps=10,
        save_strategy="no",
        seed=args.seed,
        bf16=False,
    )
    trainer = Trainer(
        model=model_dir, reward_funcs=trl_reward(metric_name), args=config, train_dataset=dataset
    )
    start = time.time()
    trainer.train()
    wall = time.time() - start
    trained = Path(out) / "final"
    trainer.save_model(str(trained))
    lm = LanguageModel(str(trained), device=args.device)
    after = greedy_metric(
        lm, ENV_FOR_TASK[args.task], "test", args.eval_samples, args.max_new_tokens, metric_name
    )
    shutil.rmtree(out, ignore_errors=True)
    completions = config.max_steps * batch
    return {
        "test_metric_after": after,
        "completions": completions,
        "completions_per_s": completions / wall,
        "wall_s": round(wall, 1),
    }


TRAINERS = ("textenvs_ppo", "grpo", "rloo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: budgets every trainer meets exactly, known trainers and metric."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=list(ENV_FOR_TASK), default="summarize")
    p.add_argument("--reward", default=None, help="metric name (default: the task's)")
    p.add_argument("--completions", type=int, default=1024, help="sampled completions per trainer")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument(
        "--batch", type=int, default=32, help="completions per optimisation step (all trainers)"
    )
    p.add_argument(
        "--generations", type=int, default=4, help="completions per prompt (GRPO / RLOO groups)"
    )
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--kl-coef", type=float, default=0.02)
    p.add_argument(
        "--ppo-epochs",
        type=int,
        default=1,
        help="textenvs PPO epochs per rollout; 1 matches TRL's GRPO / RLOO default "
        "(num_iterations=1), so every trainer takes one optimisation pass over each batch",
    )
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in (
        "completions",
        "max_new_tokens",
        "batch",
        "generations",
        "eval_samples",
        "ppo_epochs",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.completions % args.batch:
        p.error(
            f"--completions {args.completions} is not a multiple of --batch {args.batch}: every "
            "trainer must sample the same number of completions, in whole optimisation steps"
        )
    if args.batch % args.generations:
        p.error(
            f"--batch {args.batch} is not a multiple of --generations {args.generations}: GRPO and "
            "RLOO sample whole groups of completions per prompt"
        )
    if args.reward is not None and args.reward not in METRIC_NAMES:
        p.error(f"unknown --reward {args.reward!r}; choose one of {', '.join(METRIC_NAMES)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    metric_name = args.reward or builtin_task(args.task).default_reward
    env_id = ENV_FOR_TASK[args.task]
    model_dir = tempfile.mkdtemp(prefix="textenvs-tiny-")
    shutil.copytree(
        BUILTIN_MODELS[textenvs.TINY], model_dir, dirs_exist_ok=True
    )  # TRL reloads from a folder
    before = greedy_metric(
        LanguageModel(model_dir, device=args.device),
        env_id,
        "test",
        args.eval_samples,
        args.max_new_tokens,
        metric_name,
    )
    report = {
        "task": args.task,
        "metric": metric_name,
        "completions": args.completions,
        "test_metric_before": before,
    }
    for name in args.trainers:
        if name == "textenvs_ppo":
            trainer = TokenPPO(
                TokenPPOConfig(
                    env_id=env_id,
                    model=model_dir,
                    reward=metric_name,
                    num_envs=args.batch,
                    max_new_tokens=args.max_new_tokens,
                    total_episodes=args.completions,
                    learning_rate=args.learning_rate,
                    kl_coef=args.kl_coef,
                    num_epochs=args.ppo_epochs,
                    device=args.device,
                    seed=args.seed,
                    eval_samples=args.eval_samples,
                )
            )
            start = time.time()
            trainer.train(progress=False)
            wall = time.time() - start
            report[name] = {
                "test_metric_after": trainer.evaluate(),
                "completions": trainer.iteration * args.batch,
                "completions_per_s": trainer.iteration * args.batch / wall,
                "wall_s": round(wall, 1),
                "final_kl": trainer.history[-1]["kl"],
            }
        else:
            report[name] = run_trl(name, model_dir, args, metric_name)
        print(json.dumps({name: report[name]}), flush=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
