"""Items to rate, from a JSONL of generations or from an env's own episodes.

* :func:`items_from_jsonl`: one item per line, ``{"prompt": ..., "text": ...}`` (rated 1-5) or
  ``{"prompt": ..., "texts": [a, b]}`` (a preference), with an optional ``"reference"``; any other
  keys are kept as the item's origin.
* :func:`items_from_env`: episodes of a generation id on its test split, the text written by the
  env's LM (sampled at a temperature, or greedy); with ``versus_kwargs`` each prompt's item pairs
  the texts of two env configurations (a base model against a trained one, ``{"model":
  folder}``), or with ``pairs=True`` two samples of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from textenvs.checks import check_choice, check_float, check_positive_int
from textenvs.rate.export import read_jsonl
from textenvs.rate.store import Item

POLICIES = ("sample", "greedy")


def items_from_jsonl(path: str | os.PathLike) -> list[Item]:
    """The items of a JSONL file (see the module docstring); a clear error names the bad line."""
    items = []
    for number, row in read_jsonl(path):
        where = f"{path}, line {number}"
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{where} needs a JSON object with a "prompt" string.')
        if ("text" in row) == ("texts" in row):
            raise ValueError(
                f'{where} needs "text" (one text, rated 1-5) or "texts" (two, a preference).'
            )
        texts = [row["text"]] if "text" in row else row["texts"]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f'{where}: "text" is a string, "texts" a list of two strings.')
        origin = {k: v for k, v in row.items() if k not in ("prompt", "text", "texts")}
        origin.pop("reference", None)
        origin.setdefault("file", Path(path).name)
        origin.setdefault("line", number)
        try:
            items.append(Item(row["prompt"], tuple(texts), str(row.get("reference", "")), origin))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
    return items


def _episode(env, index: int, policy: str, temperature: float, rng) -> dict:
    """One test episode on sample ``index``; the policy reads the LM's log-probabilities of the
    actions, the last ``action_space.n`` numbers of a ``candidates_obs`` observation."""
    obs, info = env.reset(seed=index, options={"index": index})
    n = env.action_space.n
    done = False
    while not done:
        logprobs = np.asarray(obs[-n:], dtype=np.float64)
        if policy == "greedy":
            action = int(np.argmax(logprobs))
        else:
            p = np.exp((logprobs - logprobs.max()) / temperature)
            action = int(rng.choice(n, p=p / p.sum()))
        obs, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
    return info


def items_from_env(
    env_id: str,
    n: int,
    policy: str = "sample",
    temperature: float = 1.0,
    seed: int = 0,
    split: str = "test",
    env_kwargs: dict | None = None,
    versus_kwargs: dict | None = None,
    pairs: bool = False,
) -> list[Item]:
    """Items from the first ``n`` samples of ``split`` of a generation id: one text each (rated
    1-5), or a pair: the same prompt written by ``env_kwargs`` and by ``versus_kwargs``, or (with
    ``pairs``) sampled twice. A pair whose two texts are equal is left out.

    ``policy``: ``"sample"`` (the env's LM at ``temperature``, seeded by ``seed``) or
    ``"greedy"``. ``env_kwargs`` go to ``gym.make`` (``model=`` a trained policy's folder)."""
    import gymnasium as gym

    from textenvs import is_edit_env

    check_positive_int("n", n)
    check_choice("policy", policy, POLICIES)
    check_float("temperature", temperature, 0, low_open=True)
    if is_edit_env(env_id):
        raise ValueError(
            f"{env_id} is an editing env, whose actions are edits, not the LM's tokens: write its "
            "episodes' texts to a JSONL and rate that (items_from_jsonl)."
        )
    if pairs and versus_kwargs is not None:
        raise ValueError("Give versus_kwargs (two configurations) or pairs (two samples): one.")
    if pairs and policy == "greedy":
        raise ValueError("pairs=True samples each prompt twice; greedy decoding would repeat.")
    configs = [dict(env_kwargs or {})]
    if versus_kwargs is not None:
        configs.append(dict(versus_kwargs))
    texts: list[list[dict]] = []
    for config in configs:
        env = gym.make(env_id, split=split, candidates_obs=True, **config)
        rng = np.random.default_rng(seed)
        try:
            limit = len(env.unwrapped.samples)
            if n > limit:
                raise ValueError(f"{env_id}'s {split} split has {limit} samples, not {n}.")
            for _ in range(2 if pairs else 1):
                texts.append([_episode(env, i, policy, temperature, rng) for i in range(n)])
        finally:
            env.close()
    items = []
    for i in range(n):
        infos = [episodes[i] for episodes in texts]
        if len(infos) == 2 and infos[0]["text"] == infos[1]["text"]:
            continue  # nothing to choose between
        origin = {"env": env_id, "split": split, "index": i, "policy": policy, "seed": seed}
        if policy == "sample":
            origin["temperature"] = temperature
        origin["configs"] = [json.dumps(c, sort_keys=True, default=str) for c in configs]
        items.append(
            Item(
                infos[0]["prompt"],
                tuple(info["text"] for info in infos),
                str(infos[0]["reference"]),
                origin,
            )
        )
    return items
