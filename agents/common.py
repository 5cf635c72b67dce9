"""Pieces the agents share: evaluation of a policy over a split, greedy decoding's metric, the task
metric of an episode, and a command-line boolean.

They read the env -> agent contract only (README, "The env -> agent contract"): ``info["metric"]``
and ``info["metric_name"]``, ``env.unwrapped.samples`` and ``reset(options={"index": i})``.
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np

from textenvs.wrappers import find_action_masks


def metric_of(info: dict) -> dict:
    """``{"metric", "metric_name"}`` of an info that carries the task metric, else ``{}``."""
    if "metric" not in info:
        return {}
    return {"metric": float(info["metric"]), "metric_name": info["metric_name"]}


def evaluate_policy(
    env: gym.Env,
    policy,
    episodes: int | None = None,
    seed: int = 0,
    max_samples: int | None = None,
    with_env: bool = False,
) -> dict:
    """Run ``policy(obs, mask) -> action`` for whole episodes and average return and task metric.

    When the env has a split of samples (a textenvs env: ``env.unwrapped.samples``) and
    ``episodes`` is None, each sample (the first ``max_samples``) is played once with
    ``reset(options={"index": i})``; otherwise ``episodes`` seeded resets. ``with_env=True`` calls
    ``policy(obs, mask, env)``.
    """
    samples = getattr(env.unwrapped, "samples", None)
    by_index = samples is not None and episodes is None
    indices = (
        range(min(len(samples), max_samples or len(samples))) if by_index else range(episodes or 10)
    )
    masks = find_action_masks(env)
    returns, metrics, name, texts = [], [], None, []
    for j in indices:
        obs, info = env.reset(seed=seed + j, options={"index": j} if by_index else None)
        ret, done = 0.0, False
        while not done:
            mask = np.asarray(masks(), dtype=bool) if masks is not None else None
            action = policy(obs, mask, env) if with_env else policy(obs, mask)
            obs, reward, terminated, truncated, info = env.step(action)
            ret += reward
            done = terminated or truncated
        returns.append(ret)
        if "metric" in info:
            metrics.append(float(info["metric"]))
            name = info.get("metric_name", name)
        if "text" in info:
            texts.append((str(info["text"]), str(info.get("prompt", ""))))
    return _summary(returns, metrics, name, texts)


def _summary(
    returns, metrics: list[float], metric_name: str | None = None, texts: list | None = None
) -> dict:
    """What an evaluation returns: episodes, mean return and, where the episodes ended with the
    task metric, its name, its mean and the per-episode values; where every episode ended with
    its text, ``texts`` and ``prompts`` (episode order: what
    :func:`textenvs.text_stats.text_report` reads).
    """
    out = {"episodes": len(returns), "mean_return": float(np.mean(returns))}
    if texts and len(texts) == len(returns):
        out["texts"] = [text for text, _ in texts]
        out["prompts"] = [prompt for _, prompt in texts]
    if metrics:
        if metric_name:
            out["metric_name"] = str(metric_name)
        out["mean_metric"] = float(np.mean(metrics))
        out["metrics"] = metrics
    return out


def with_text_stats(result: dict, model: str | None = None, device: str = "cpu") -> dict:
    """``result`` with its ``texts`` and ``prompts`` replaced by ``text_stats``: their length,
    diversity and (given ``model``, a frozen causal LM) perplexity
    (:func:`textenvs.text_stats.text_report`)."""
    from textenvs.text_stats import text_report

    texts, prompts = result.pop("texts", None), result.pop("prompts", None)
    if texts:
        result["text_stats"] = text_report(texts, prompts, model, device)
    return result


def result_line(result: dict, unit: str) -> str:
    """The one line an agent command ends with: the metric by name, its mean and over what
    (``test rougeL 0.1016: mean over 200 test samples``); the mean return where no metric."""
    if "mean_metric" in result:
        name = result.get("metric_name", "metric")
        return f"test {name} {result['mean_metric']:.4f}: mean over {result['episodes']} {unit}"
    return f"test return {result['mean_return']:.4f}: mean over {result['episodes']} {unit}"


def evaluate_policy_batched(
    envs: gym.vector.VectorEnv, policy, max_samples: int | None = None, with_env: bool = False
):
    """:func:`evaluate_policy` over a textenvs batched vector env: the same samples in the same
    order, N at a time, their forwards batched (what a sequential evaluation of a split runs one
    sample after the other).

    Sub-env ``i`` plays one sample at a time: a partial reset (``reset_mask`` True at ``i`` alone,
    ``options={"index": j}``) starts it on sample ``j``, whatever the env's autoreset mode.
    ``policy(obs, mask) -> action`` is called per
    sub-env, with that sub-env's mask (edit envs need ``flat_actions=True``: the vector env takes
    no wrapper). ``with_env=True`` calls ``policy(obs, mask, env)`` with the sub-env itself, for a
    policy that reads it (tabular Q-learning's LM prior reads the sub-env's candidates).
    Returns what :func:`evaluate_policy` returns, metrics in sample order.
    """
    subs = envs.unwrapped.envs
    samples = subs[0].unwrapped.samples
    n = min(len(samples), max_samples or len(samples))
    has_masks = hasattr(subs[0].unwrapped, "action_masks")  # edit envs
    queue = iter(range(n))
    playing: list[int | None] = [None] * len(subs)
    obs: list = [None] * len(subs)
    returns = np.zeros(n)
    metrics: dict[int, float] = {}
    texts: dict[int, tuple[str, str]] = {}
    name = None
    # the first samples in ONE batched reset, one sample index per sub-env (sub-envs left without
    # a sample get any; they play nothing)
    playing[:] = [next(queue, None) for _ in subs]
    batch, _ = envs.reset(
        seed=[i if j is None else j for i, j in enumerate(playing)],
        options={"index": [0 if j is None else j for j in playing]},
    )
    obs[:] = list(batch)

    same_step = envs.metadata.get("autoreset_mode") == gym.vector.AutoresetMode.SAME_STEP

    def start(i: int) -> None:
        j = next(queue, None)
        playing[i] = j
        if j is not None:
            mask = np.arange(len(subs)) == i
            seeds = [j if k == i else None for k in range(len(subs))]
            batch, _ = envs.reset(seed=seeds, options={"reset_mask": mask, "index": j})
            obs[i] = batch[i]

    while any(j is not None for j in playing):
        masks = envs.unwrapped.action_masks() if has_masks else None
        actions = [
            policy(obs[i], None if masks is None else masks[i], *([subs[i]] if with_env else []))
            if j is not None
            else 0
            for i, j in enumerate(playing)
        ]
        next_obs, rewards, terminated, truncated, infos = envs.step(np.asarray(actions))
        for i, j in enumerate(playing):
            if j is None:
                continue
            returns[j] += rewards[i]
            if terminated[i] or truncated[i]:
                final = infos["final_info"] if same_step else infos
                if "metric" in final and final["_metric"][i]:
                    metrics[j] = float(final["metric"][i])
                    if "metric_name" in final and final["_metric_name"][i]:
                        name = final["metric_name"][i]
                if "text" in final and final["_text"][i]:  # text_infos=True
                    texts[j] = (str(final["text"][i]), str(final["prompt"][i]))
                elif not same_step:  # the sub-env still holds its finished episode
                    texts[j] = (str(subs[i].unwrapped.text), str(subs[i].unwrapped.prompt))
                start(i)
            else:
                obs[i] = next_obs[i]
    return _summary(
        returns,
        [metrics[j] for j in range(n) if j in metrics],
        name,
        [texts[j] for j in range(n) if j in texts],
    )


def parse_bool(text: str) -> bool:
    """A command-line boolean: true / false, yes / no, 1 / 0 (any case); anything else is refused
    rather than read as False."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(
        text.strip().lower()
    )
    if value is None:
        raise argparse.ArgumentTypeError(
            f"expected true or false (or yes / no, 1 / 0), got {text!r}"
        )
    return value


def greedy_evaluation(
    lm,
    env_id: str,
    split: str = "test",
    max_samples: int = 200,
    max_new_tokens: int = 16,
    reward: str | None = None,
    env_kwargs: dict | None = None,
    num_envs: int = 1,
) -> dict:
    """Greedy decoding (top-1 actions) on each of the first ``max_samples`` of a split, in
    sample order (what paired comparisons need): :func:`evaluate_policy`'s result, the metrics and
    texts included. ``env_kwargs``: more arguments of the env. ``num_envs > 1``: through a batched
    vector env of that many sub-envs (:func:`evaluate_policy_batched`: the same samples and
    values, several times faster).

    The one greedy evaluation of the project: the token trainer's ``evaluate``, the suite's
    learning curves of the token agents and ``benchmarks.compare_trl`` all call it.
    """
    import torch

    kwargs = {
        **(env_kwargs or {}),
        "model": lm,
        "split": split,
        "token_mode": "topk",
        "k": 1,
        "max_steps": max_new_tokens,
        **({"reward": reward} if reward else {}),
    }
    greedy = lambda obs, mask: 0  # noqa: E731  (top-1 of the top-k actions)
    with torch.no_grad():
        if num_envs > 1:
            envs = gym.make_vec(env_id, num_envs=num_envs, **kwargs)
            return evaluate_policy_batched(envs, greedy, max_samples=max_samples)
        return evaluate_policy(gym.make(env_id, **kwargs), greedy, max_samples=max_samples)


def greedy_metrics(*args, **kwargs) -> list[float]:
    """The per-sample task metrics of :func:`greedy_evaluation` (same arguments)."""
    return greedy_evaluation(*args, **kwargs)["metrics"]


def greedy_metric(*args, **kwargs) -> float:
    """Mean of :func:`greedy_metrics` (same arguments)."""
    return float(np.mean(greedy_metrics(*args, **kwargs)))
