"""Do the agents learn? Q-learning and SB3 PPO against a uniform-random policy and the greedy LM.

``python -m benchmarks.agents --seeds 5 --out results/agents`` trains every agent on the train
split of ``textenvs/Summarize-v0`` and ``textenvs/Translate-v0`` (top-k actions) and
``textenvs/EditSummary-v0`` (flattened / masked edits), for each seed, and evaluates it on the test
split next to two baselines in the same action space:

* ``random``: uniformly random among the valid actions, seeded;
* ``greedy``: action 0 (the LM's most likely token; for the edit env, stop: keep the LM's draft).

It prints (and writes) one JSON object with every raw figure and a Markdown table: mean test
metric and 95% bootstrap CI per agent, and the difference to random and to greedy with a
hierarchical bootstrap CI (resample seeds, then test samples within each seed, paired by sample).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

import textenvs
from agents import sb3
from agents.common import evaluate_policy
from agents.qlearning import QLearning, QLearningConfig, make_tabular_env
from textenvs import is_edit_env

ENVS = ("textenvs/Summarize-v0", "textenvs/Translate-v0", "textenvs/EditSummary-v0")


def env_kwargs(env_id: str, k: int, horizon: int) -> dict:
    if is_edit_env(env_id):
        return {"token_mode": "topk", "k": k, "max_edits": horizon, "max_len": 24}
    return {"action_mode": "topk", "k": k, "max_new_tokens": horizon}


def baseline_policy(name: str, seed: int):
    rng = np.random.default_rng(seed)

    def policy(obs, mask):
        if name == "greedy":
            return 0  # top-k: the most likely token; flattened edits: stop
        if mask is not None:
            return int(rng.choice(np.flatnonzero(mask)))
        return int(rng.integers(policy.n))

    return policy


def run_cell(agent: str, env_id: str, seed: int, args: argparse.Namespace) -> dict:
    """Train (if needed) and evaluate one agent on one env for one seed."""
    kwargs = env_kwargs(env_id, args.k, args.horizon)
    start = time.time()
    if agent in ("random", "greedy"):
        env = gym.make(env_id, split="test", **kwargs)
        if is_edit_env(env_id):
            from textenvs.wrappers import FlattenEditActions

            env = FlattenEditActions(env)
        policy = baseline_policy(agent, seed)
        policy.n = env.action_space.n
        result = evaluate_policy(env, policy, max_samples=args.eval_samples)
        steps = 0
    elif agent == "qlearning":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("k", "action_mode", "token_mode")}  # set by the helper
        train = make_tabular_env(env_id, "train", args.k, args.discretizer, args.n_bits, args.n_clusters, seed, **kwargs)
        learner = QLearning(train, QLearningConfig(seed=seed, learning_rate=args.q_lr))
        learner.learn(args.q_steps)
        test = make_tabular_env(env_id, "test", args.k, args.discretizer, args.n_bits, args.n_clusters, seed,
                                fitted=train, **kwargs)
        result = learner.evaluate(test, max_samples=args.eval_samples)
        steps = args.q_steps
    elif agent == "ppo":
        algo = "maskable_ppo" if is_edit_env(env_id) else "ppo"
        config = sb3.SB3Config(algo=algo, num_envs=args.num_envs, seed=seed, n_steps=32, batch_size=128)
        model = sb3.build(env_id, config, **kwargs)
        model.learn(args.ppo_steps)
        result = sb3.evaluate(model, env_id, "test", args.eval_samples, **kwargs)
        steps = args.ppo_steps
    else:
        raise ValueError(f"Unknown agent {agent!r}: choose one of random, greedy, qlearning, ppo.")
    return {"agent": agent, "env_id": env_id, "seed": seed, "steps": steps, "wall_s": round(time.time() - start, 1),
            "mean_metric": result["mean_metric"], "metrics": result["metrics"]}


def bootstrap_mean_ci(per_seed: list[np.ndarray], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% CI by a hierarchical bootstrap: resample seeds, then samples within each seed."""
    rng = np.random.default_rng(seed)
    per_seed = [np.asarray(x, dtype=np.float64) for x in per_seed]
    means = np.empty(n_boot)
    for b in range(n_boot):
        picked = rng.integers(len(per_seed), size=len(per_seed))
        means[b] = np.mean([per_seed[i][rng.integers(len(per_seed[i]), size=len(per_seed[i]))].mean() for i in picked])
    point = float(np.mean([x.mean() for x in per_seed]))
    return point, float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize(cells: list[dict]) -> list[dict]:
    rows = []
    for env_id in dict.fromkeys(c["env_id"] for c in cells):
        by_agent = {}
        for c in cells:
            if c["env_id"] == env_id:
                by_agent.setdefault(c["agent"], {})[c["seed"]] = np.asarray(c["metrics"])
        for agent, runs in by_agent.items():
            seeds = sorted(runs)
            row = {"env_id": env_id, "agent": agent, "seeds": len(seeds),
                   "steps": max(c["steps"] for c in cells if c["env_id"] == env_id and c["agent"] == agent),
                   "wall_s": round(sum(c["wall_s"] for c in cells if c["env_id"] == env_id and c["agent"] == agent), 1)}
            row["mean"], row["ci_low"], row["ci_high"] = bootstrap_mean_ci([runs[s] for s in seeds])
            for base in ("random", "greedy"):
                if base in by_agent and agent != base:
                    diffs = [runs[s] - by_agent[base][s] for s in seeds if s in by_agent[base]]
                    d, lo, hi = bootstrap_mean_ci(diffs)
                    row[f"vs_{base}"] = {"diff": d, "ci_low": lo, "ci_high": hi, "excludes_zero": lo > 0 or hi < 0}
            rows.append(row)
    return rows


def _diff_cell(row: dict, key: str) -> str:
    if key not in row:
        return ""
    d = row[key]
    return f"{d['diff']:+.4f} ({d['ci_low']:+.4f}, {d['ci_high']:+.4f})"


def markdown(rows: list[dict]) -> str:
    lines = ["| env | agent | test metric (95% CI) | - random (95% CI) | - greedy (95% CI) | steps | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['env_id'].split('/')[1]} | {r['agent']} | {r['mean']:.4f} ({r['ci_low']:.4f}, "
                     f"{r['ci_high']:.4f}) | {_diff_cell(r, 'vs_random')} | {_diff_cell(r, 'vs_greedy')} | "
                     f"{r['steps']} | {r['wall_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", nargs="+", default=list(ENVS))
    p.add_argument("--agents", nargs="+", default=["random", "greedy", "qlearning", "ppo"])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--horizon", type=int, default=12, help="max_new_tokens / max_edits")
    p.add_argument("--q-steps", type=int, default=24_000)
    p.add_argument("--q-lr", type=float, default=0.1)
    p.add_argument("--discretizer", default="hash")
    p.add_argument("--n-bits", type=int, default=6)
    p.add_argument("--n-clusters", type=int, default=64)
    p.add_argument("--ppo-steps", type=int, default=32_000)
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--out", default="results/agents")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = []
    raw = out / "cells.jsonl"
    done = set()
    if raw.exists():  # resume: keep finished cells
        for line in raw.read_text().splitlines():
            c = json.loads(line)
            cells.append(c)
            done.add((c["agent"], c["env_id"], c["seed"]))
    for env_id in args.envs:
        for seed in range(args.seeds):
            for agent in args.agents:
                if (agent, env_id, seed) in done:
                    continue
                cell = run_cell(agent, env_id, seed, args)
                cells.append(cell)
                with raw.open("a") as f:
                    f.write(json.dumps(cell) + "\n")
                print(f"{env_id} seed {seed} {agent}: {cell['mean_metric']:.4f} ({cell['wall_s']} s)", flush=True)
    rows = summarize(cells)
    table = markdown(rows)
    report = {"args": vars(args), "rows": rows, "versions": {"textenvs": textenvs.__version__}}
    (out / "summary.json").write_text(json.dumps(report, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
