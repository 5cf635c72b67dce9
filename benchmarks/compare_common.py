"""What both sides of ``benchmarks.compare_trl`` share: the tasks, the trainers, the reward TRL
is given (the env's completion text, counted), the configs of ours and TRL's for a grid point,
and one run of each (timed, its greedy test metrics through the same env)."""

from __future__ import annotations

import argparse
import itertools
import shutil
import time
from pathlib import Path

import numpy as np

from agents.token_ppo import TokenPPO, TokenPPOConfig
from textenvs.lm import LanguageModel
from textenvs.rewards import get_metric

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


def train_clock():
    """A TRL ``TrainerCallback`` whose ``seconds`` run from ``on_train_begin`` (the optimizer,
    scheduler and data loader made) to ``on_train_end``: TRL's training loop without its
    set-up, as ours is timed. (Defined on call: transformers loads late.)"""
    from transformers import TrainerCallback

    class TrainClock(TrainerCallback):
        def __init__(self) -> None:
            self.start, self.seconds = None, 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.time()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.time() - self.start

    return TrainClock()


def run_ours(config: TokenPPOConfig):
    """Train our token trainer; returns it, its training history, the completions it sampled, its
    optimizer steps (counted by a hook on the optimizer) and the wall seconds of ``train()`` (the
    trainer is built before the clock starts, as TRL's set-up is left out of its time)."""
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
    clock = train_clock()
    trainer.add_callback(clock)
    trainer.train()
    wall = clock.seconds  # from TRL's on_train_begin: its set-up inside train() is not counted
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
