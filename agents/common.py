"""Pieces the agents share: evaluation of a policy over a split, the task metric of an episode.

They read the env -> agent contract only (README, "The env -> agent contract"): ``info["metric"]``
and ``info["metric_name"]``, ``env.unwrapped.samples`` and ``reset(options={"index": i})``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from textenvs.wrappers import find_action_masks


def metric_of(info: dict) -> dict:
    """``{"metric", "metric_name"}`` of an info that carries the task metric, else ``{}``."""
    if "metric" not in info:
        return {}
    return {"metric": float(info["metric"]), "metric_name": info["metric_name"]}


def evaluate_policy(
    env: gym.Env, policy, episodes: int | None = None, seed: int = 0, max_samples: int | None = None
) -> dict:
    """Run ``policy(obs, mask) -> action`` for whole episodes and average return and task metric.

    When the env has a split of samples (a textenvs env: ``env.unwrapped.samples``) and
    ``episodes`` is None, each sample (the first ``max_samples``) is played once with
    ``reset(options={"index": i})``; otherwise ``episodes`` seeded resets.
    """
    samples = getattr(env.unwrapped, "samples", None)
    by_index = samples is not None and episodes is None
    indices = (
        range(min(len(samples), max_samples or len(samples))) if by_index else range(episodes or 10)
    )
    masks = find_action_masks(env)
    returns, metrics = [], []
    for j in indices:
        obs, info = env.reset(seed=seed + j, options={"index": j} if by_index else None)
        ret, done = 0.0, False
        while not done:
            mask = np.asarray(masks(), dtype=bool) if masks is not None else None
            obs, reward, terminated, truncated, info = env.step(policy(obs, mask))
            ret += reward
            done = terminated or truncated
        returns.append(ret)
        if "metric" in info:
            metrics.append(float(info["metric"]))
    out = {"episodes": len(returns), "mean_return": float(np.mean(returns))}
    if metrics:
        out["mean_metric"] = float(np.mean(metrics))
        out["metrics"] = metrics
    return out
