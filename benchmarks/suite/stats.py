"""The suite's statistics: bootstrap CIs over seeds, the interquartile mean, the hierarchical
(seeds, then test samples) bootstrap, and one row per (env, agent) with its paired differences
against the agents the registry pairs it with."""

from __future__ import annotations

import numpy as np

from benchmarks.suite.agents import AGENTS, REGISTRY


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap CI of the mean over seeds."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(len(values), size=(n_boot, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def iqm(values) -> float:
    """Interquartile mean across seeds (Agarwal et al. 2021, rliable): the middle 50%'s mean."""
    from scipy.stats import trim_mean

    return float(trim_mean(np.asarray(values, dtype=np.float64), 0.25))


def hierarchical_bootstrap(
    per_seed: list, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean over seeds of the per-seed means, and its 95% CI from a two-level bootstrap.

    Each replicate resamples the seeds, then the test samples within each resampled seed, so the
    CI covers both the training noise (seeds) and the evaluation noise (which test samples).

    Args:
        per_seed: One array of per-sample values per seed (per-sample differences for a paired
        test).
    """
    rng = np.random.default_rng(seed)
    per_seed = [np.asarray(x, dtype=np.float64) for x in per_seed]
    means = np.empty(n_boot)
    for b in range(n_boot):
        picked = rng.integers(len(per_seed), size=len(per_seed))
        means[b] = np.mean(
            [
                per_seed[i][rng.integers(len(per_seed[i]), size=len(per_seed[i]))].mean()
                for i in picked
            ]
        )
    point = float(np.mean([x.mean() for x in per_seed]))
    return point, float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def final_per_sample(cell: dict) -> np.ndarray:
    """The per-test-sample metrics of a cell's last evaluation (samples in index order)."""
    return np.asarray(cell["curve"][-1]["metrics"], dtype=np.float64)


def mean_text_stats(per_seed: list[dict | None]) -> dict | None:
    """Each text statistic's mean over the seeds that have it (cells of runs before the
    statistics existed have none)."""
    have = [s for s in per_seed if s]
    if not have:
        return None
    keys = dict.fromkeys(k for s in have for k in s)
    means = {}
    for k in keys:
        values = [s[k] for s in have if s.get(k) is not None]
        means[k] = float(np.mean(values)) if values else None
    return means


def aggregate(cells: list[dict]) -> list[dict]:
    """One row per (env, agent): the final test metric over seeds and samples, and paired
    differences.

    ``vs_random`` / ``vs_greedy``: the agent's per-sample metric minus the baseline's on the same
    test sample and seed, through :func:`hierarchical_bootstrap`; present where the baseline ran.
    """
    rows = []
    for env_id in dict.fromkeys(c["env_id"] for c in cells):
        by_agent: dict[str, dict[int, dict]] = {}
        for c in cells:
            if c["env_id"] == env_id:
                by_agent.setdefault(c["agent"], {})[c["seed"]] = c
        for agent in AGENTS:
            runs = by_agent.get(agent)
            if not runs:
                continue
            seeds = sorted(runs)
            mean, low, high = hierarchical_bootstrap([final_per_sample(runs[s]) for s in seeds])
            row = {
                "env_id": env_id,
                "agent": agent,
                "seeds": len(seeds),
                "mean": mean,
                "ci_low": low,
                "ci_high": high,
                "iqm": iqm([runs[s]["final_metric"] for s in seeds]),
                "steps": max(runs[s]["steps"] for s in seeds),
                "text_stats": mean_text_stats([runs[s].get("text_stats") for s in seeds]),
            }
            for base in REGISTRY[agent].paired_with:  # the registry says what it is paired with
                baseline = by_agent.get(base, {})
                if agent == base:
                    continue
                diffs = [
                    final_per_sample(runs[s]) - final_per_sample(baseline[s])
                    for s in seeds
                    if s in baseline
                    and len(final_per_sample(baseline[s])) == len(final_per_sample(runs[s]))
                ]
                if diffs:
                    d, lo, hi = hierarchical_bootstrap(diffs)
                    row[f"vs_{base}"] = {
                        "diff": d,
                        "ci_low": lo,
                        "ci_high": hi,
                        "excludes_zero": lo > 0 or hi < 0,
                    }
            rows.append(row)
    return rows
