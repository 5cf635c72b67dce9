"""One cell of the suite: an agent trained on one env for one seed, its learning curve on the test
split. :func:`run_cell` looks the agent up in the registry and hands its runner a :class:`Cell`.

Every evaluation plays the first ``eval_samples`` test samples in order, so two agents' results are
paired by sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

import textenvs
from benchmarks.suite.agents import AGENTS, REGISTRY
from benchmarks.suite.settings import Budget, env_kwargs

EVAL_ENVS = 16  # sub-envs of a batched evaluation (generation envs)


def test_env(env_id: str, kwargs: dict) -> gym.Env | gym.vector.VectorEnv:
    """The test-split env to evaluate on. Generation ids: a batched vector env of ``EVAL_ENVS``
    sub-envs (:func:`agents.common.evaluate_policy_batched`: the same samples and results as one
    env, several times faster). Edit ids: one env, in a ``Discrete`` action space (edits flattened,
    with an exact action mask); a batched edit evaluation restarts every ended sub-env twice (its
    autoreset, then the next sample), which costs more than it saves.
    """
    from textenvs.wrappers import FlattenEditActions

    if not textenvs.is_edit_env(env_id):
        return gym.make_vec(env_id, num_envs=EVAL_ENVS, split="test", **kwargs)
    env = gym.make(env_id, split="test", **kwargs)
    return (
        FlattenEditActions(env) if isinstance(env.action_space, gym.spaces.MultiDiscrete) else env
    )


def evaluate(env, policy, max_samples: int, with_env: bool = False) -> dict:
    """``policy(obs, mask)`` (``policy(obs, mask, env)`` ``with_env``: the (sub-)env it acts in) on
    the first ``max_samples`` test samples of ``env`` (a :func:`test_env`), one episode each, in
    sample order."""
    from agents.common import evaluate_policy, evaluate_policy_batched

    if isinstance(env, gym.vector.VectorEnv):
        return evaluate_policy_batched(env, policy, max_samples=max_samples, with_env=with_env)
    return evaluate_policy(env, policy, max_samples=max_samples, with_env=with_env)


@dataclass
class Cell:
    """What a runner needs: the cell, its env keyword arguments (:func:`env_kwargs`, which a
    runner only adds to) and the learning curve it records."""

    agent: str
    env_id: str
    seed: int
    budget: Budget
    model: str
    extra: dict | None
    kwargs: dict = field(init=False)
    curve: list[dict] = field(default_factory=list)
    last_texts: tuple[list[str], list[str]] | None = None  # (texts, prompts) of the last point

    def __post_init__(self) -> None:
        self.kwargs = env_kwargs(self.budget, self.model, self.env_id, self.extra)

    def test_env(self, kwargs: dict | None = None):
        """The test-split env of this cell (``kwargs``: the runner's, else the cell's)."""
        return test_env(self.env_id, self.kwargs if kwargs is None else kwargs)

    def record(self, steps: int, policy, env, with_env: bool = False) -> None:
        """A point of the learning curve: ``policy`` on the test samples after ``steps``."""
        result = evaluate(env, policy, max_samples=self.budget.eval_samples, with_env=with_env)
        self.curve.append(
            {"steps": steps, "metric": result["mean_metric"], "metrics": result["metrics"]}
        )
        self._keep_texts(result)

    def _keep_texts(self, result: dict) -> None:
        if "texts" in result:
            self.last_texts = (result["texts"], result["prompts"])

    def record_greedy(self, steps: int, trainer) -> None:
        """A point of a token trainer's curve: greedy decoding of its current policy on the test
        samples (the env's metric), batched (:func:`agents.common.greedy_metrics`)."""
        from agents.common import greedy_evaluation

        result = greedy_evaluation(
            trainer.lm,
            trainer.config.env_id,
            "test",
            self.budget.eval_samples,
            trainer.config.max_new_tokens,
            env_kwargs=trainer.config.env_kwargs,
            num_envs=EVAL_ENVS,
        )
        metrics = result["metrics"]
        self.curve.append({"steps": steps, "metric": float(np.mean(metrics)), "metrics": metrics})
        self._keep_texts(result)

    def text_stats(self) -> dict | None:
        """Length, diversity and perplexity (under the suite's frozen model) of the texts of the
        last evaluation (:func:`textenvs.text_stats.text_report`)."""
        from textenvs.text_stats import text_report

        if self.last_texts is None:
            return None
        texts, prompts = self.last_texts
        return text_report(texts, prompts, self.model)


def run_cell(
    agent: str, env_id: str, seed: int, budget: Budget, model: str, extra: dict | None = None
) -> dict:
    """Train one agent on one env for one seed; the learning curve on the test split."""
    if agent not in REGISTRY:
        raise ValueError(f"Unknown agent {agent!r}: choose from {list(AGENTS)}.")
    cell = Cell(agent, env_id, seed, budget, model, extra)
    start = time.time()
    steps = REGISTRY[agent].run(cell)
    return {
        "agent": agent,
        "env_id": env_id,
        "seed": seed,
        "steps": steps,
        "wall_s": round(time.time() - start, 2),
        "final_metric": cell.curve[-1]["metric"],
        "curve": cell.curve,
        "text_stats": cell.text_stats(),
        "final_texts": cell.last_texts[0] if cell.last_texts else None,
    }
