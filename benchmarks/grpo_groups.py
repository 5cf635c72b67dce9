"""What GRPO's groups hold: how many have no spread in their score, how many are equal texts,
and how large the advantages of the groups without spread are, with the KL to the reference in
the reward or in the loss (TRL's placement, our default for GRPO since issue 46).

    python -m benchmarks.grpo_groups --iterations 8 --json-out benchmarks/latest/grpo_groups.json

Runs the suite's ``token_grpo`` cell settings (the default preset) on one env for a few
iterations per placement and prints one JSON object: per placement, the groups seen, those whose
completions all score the same metric, those whose texts are all equal, and the mean |advantage|
in each kind of group. Nothing here changes the trainer: it reads each update's rollout and
advantages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

import textenvs
from textenvs.cli import int_arg, run_cli


def group_figures(config, iterations: int) -> dict:
    """Train ``iterations`` updates of ``config`` and count what its groups hold."""
    from agents.token_ppo import TokenPPO

    trainer = TokenPPO(config)
    seen = {"groups": 0, "no_spread": 0, "equal_texts": 0, "all_zero": 0}
    abs_adv = {"no_spread": [], "spread": []}
    advantages_of = trainer.estimator.advantages
    captured = {}

    def capture(*args, **kwargs):
        out = advantages_of(*args, **kwargs)
        captured["per_episode"] = out.per_episode.detach().cpu().numpy()
        return out

    trainer.estimator.advantages = capture
    update = trainer.update

    def counted(rollout):
        stats = update(rollout)
        g = config.group_size
        metrics = np.asarray(rollout.metrics, dtype=float).reshape(-1, g)
        texts = np.asarray(rollout.texts, dtype=object).reshape(-1, g)
        adv = np.abs(captured["per_episode"]).reshape(-1, g)
        for m, t, a in zip(metrics, texts, adv):
            seen["groups"] += 1
            flat = bool(np.all(m == m[0]))
            seen["no_spread"] += flat
            seen["all_zero"] += bool(flat and m[0] == 0)
            seen["equal_texts"] += bool(all(x == t[0] for x in t))
            abs_adv["no_spread" if flat else "spread"].extend(a.tolist())
        return stats

    trainer.update = counted
    trainer.train(progress=False, stop_after=iterations)
    return {
        **seen,
        "mean_abs_advantage_no_spread": float(np.mean(abs_adv["no_spread"]))
        if abs_adv["no_spread"]
        else None,
        "mean_abs_advantage_spread": float(np.mean(abs_adv["spread"]))
        if abs_adv["spread"]
        else None,
        "kl_settings": list(config.kl_settings()),
    }


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.suite.agents import token_config
    from benchmarks.suite.commands import cell_of
    from benchmarks.suite.settings import TOKEN_GROUP_SIZE

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env-id", default="textenvs/Summarize-v0")
    p.add_argument("--iterations", type=int_arg(), default=8, help="updates per placement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int_arg(), default=2, help="torch threads")
    p.add_argument("--json-out", help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cell = cell_of(args.env_id, "token_grpo", seed=args.seed)
    base = token_config(cell, "grpo", {"group_size": TOKEN_GROUP_SIZE})
    out = {
        "command": " ".join(
            ["python -m benchmarks.grpo_groups", *(sys.argv[1:] if argv is None else argv)]
        ),
        "env_id": args.env_id,
        "model": textenvs.TINY,
        "iterations": args.iterations,
        "num_envs": base.num_envs,
        "group_size": base.group_size,
        "temperature": base.temperature,
        "kl_coef": base.kl_coef,
        "placements": {
            placement: group_figures(
                dataclasses.replace(base, kl_placement=placement), args.iterations
            )
            for placement in ("reward", "auto")
        },
    }
    print(json.dumps(out, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    run_cli(main)
