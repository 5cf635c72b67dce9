"""The suite's report: the markdown table, the one-sentence verdict, the learning curves and the
final metrics (matplotlib), every agent in its registry colour."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.suite.agents import AGENT_COLORS, AGENTS, BASELINE_STYLE, BASELINES
from benchmarks.suite.stats import bootstrap_ci


def _difference(row: dict, key: str) -> str:
    if key not in row:
        return ""
    d = row[key]
    return f"{d['diff']:+.4f} ({d['ci_low']:+.4f}, {d['ci_high']:+.4f})"


IQM_MIN_SEEDS = 4
"""The IQM trims a quarter of the seeds from each end: with fewer than 4 it trims none and equals
the mean, so the table shows it only where some row has 4 seeds or more."""


def markdown_table(rows: list[dict]) -> str:
    """The results table; a ``- token PPO`` column when the run paired token agents with it; an
    IQM column when some row has :data:`IQM_MIN_SEEDS` seeds or more."""
    against_ppo = any("vs_token_ppo" in r for r in rows)
    with_iqm = any(r["seeds"] >= IQM_MIN_SEEDS for r in rows)
    extra = " - token PPO (95% CI) |" if against_ppo else ""
    lines = [
        "| env | agent | seeds | test metric, mean (95% CI) | - random (95% CI) | - greedy (95% "
        f"CI) |{extra}{' IQM |' if with_iqm else ''} steps |",
        "|---|---|---|---|---|---|"
        + ("---|" if against_ppo else "")
        + ("---|" if with_iqm else "")
        + "---|",
    ]
    for r in rows:
        cell = f" {_difference(r, 'vs_token_ppo')} |" if against_ppo else ""
        iqm = f" {r['iqm']:.4f} |" if with_iqm else ""
        lines.append(
            f"| {r['env_id'].split('/')[-1]} | {r['agent']} | {r['seeds']} | {r['mean']:.4f} "
            f"({r['ci_low']:.4f}, {r['ci_high']:.4f}) | {_difference(r, 'vs_random')} | "
            f"{_difference(r, 'vs_greedy')} |{cell}{iqm} {r['steps']} |"
        )
    return "\n".join(lines)


TEXT_COLUMNS = (
    ("mean_words", "words", "{:.1f}"),
    ("empty_share", "empty", "{:.2f}"),
    ("distinct_1", "distinct-1", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("self_bleu", "self-BLEU", "{:.3f}"),
    ("perplexity", "perplexity", "{:.1f}"),
)


def text_table(rows: list[dict]) -> str | None:
    """The final test texts of each agent, beyond the metric: mean length in words, share empty,
    distinct-1 / -2, self-BLEU and perplexity under the suite's frozen model (each the mean over
    seeds; :mod:`textenvs.text_stats`). None when no row has them."""
    if not any(r.get("text_stats") for r in rows):
        return None
    header = " | ".join(label for _, label, _ in TEXT_COLUMNS)
    lines = [f"| env | agent | {header} |", "|---|---|" + "---|" * len(TEXT_COLUMNS)]
    for r in rows:
        stats = r.get("text_stats") or {}
        cells = " | ".join(
            "n/a" if stats.get(key) is None else fmt.format(stats[key])
            for key, _, fmt in TEXT_COLUMNS
        )
        lines.append(f"| {r['env_id'].split('/')[-1]} | {r['agent']} | {cells} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    """One sentence: which learning agents beat the greedy LM (95% CI of the paired difference
    above zero), by how much, and where none did."""
    learners = [r for r in rows if r["agent"] not in BASELINES and "vs_greedy" in r]
    wins = [r for r in learners if r["vs_greedy"]["ci_low"] > 0]
    below_random = [r for r in learners if "vs_random" in r and r["vs_random"]["ci_low"] <= 0]
    envs = list(dict.fromkeys(r["env_id"].split("/")[-1] for r in learners))
    if wins:
        parts = [
            f"{r['agent']} on {r['env_id'].split('/')[-1]} by {r['vs_greedy']['diff']:+.4f} "
            f"(95% CI {r['vs_greedy']['ci_low']:+.4f}, {r['vs_greedy']['ci_high']:+.4f})"
            for r in wins
        ]
        text = "Beat the greedy LM: " + "; ".join(parts)
        lost = [e for e in envs if not any(r["env_id"].endswith(e) for r in wins)]
        if lost:
            text += f"; no agent beat it on {', '.join(lost)}"
    else:
        text = "No learning agent beat the greedy LM (no 95% CI of the difference above zero)"
    if below_random:
        names = ", ".join(f"{r['agent']} on {r['env_id'].split('/')[-1]}" for r in below_random)
        text += f". Not above random (CI includes zero or below): {names}"
    return text + "."


def curve_band(runs: list[list[dict]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A learning curve over seeds: mean steps ``x``, mean metric, and the 95% bootstrap band of
    the mean over seeds at every evaluation point (the points all runs share)."""
    n = min(len(r) for r in runs)
    x = np.mean([[p["steps"] for p in r[:n]] for r in runs], axis=0)
    y = np.array([[p["metric"] for p in r[:n]] for r in runs])  # (seeds, points)
    band = np.array([bootstrap_ci(y[:, j]) for j in range(n)])  # (points, 2)
    return x, y.mean(0), band[:, 0], band[:, 1]


def plot(
    cells: list[dict],
    rows: list[dict],
    out: Path,
    metrics: dict[str, str] | None = None,
    caption: str | None = None,
) -> list[Path]:
    """``learning_curves.png`` (test metric against env steps per env: mean and 95% band over
    seeds, the baselines as level lines) and ``final_metrics.png`` (final test metric per env and
    agent with its 95% CI, the greedy LM's level marked); one colour per agent in both, legends
    outside the axes so no data is hidden. ``metrics``: each env id's metric name, on its axis;
    ``caption``: a line under both figures (the seeds, the commit, the date)."""
    metrics = metrics or {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(c["env_id"] for c in cells))
    agents = [a for a in AGENTS if any(c["agent"] == a for c in cells)]
    fig, axes = plt.subplots(1, len(envs), figsize=(4.6 * len(envs), 3.8), squeeze=False)
    for ax, env_id in zip(axes[0], envs):
        span = max([c["steps"] for c in cells if c["env_id"] == env_id] + [1])
        for agent in agents:
            runs = [c["curve"] for c in cells if c["env_id"] == env_id and c["agent"] == agent]
            if not runs:
                continue
            color = AGENT_COLORS[agent]
            if agent in BASELINE_STYLE:  # no training: its one evaluation as a level line
                level = np.mean([r[0]["metric"] for r in runs])
                ax.axhline(level, linestyle=BASELINE_STYLE[agent], color=color, label=agent)
                continue
            x, mean, low, high = curve_band(runs)
            ax.plot(x, mean, marker="o", markersize=4, color=color, label=agent)
            ax.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)
        ax.set_title(env_id.split("/")[-1])
        ax.set_xlabel("environment steps")
        ax.set_ylabel(f"test {metrics.get(env_id, 'metric')}")
        ax.set_xlim(0, span * 1.02)
        ax.grid(alpha=0.3)
    legend(fig, agents, caption=caption)
    curves = out / "learning_curves.png"
    fig.savefig(curves, dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 1.5 * len(envs)), 3.8))
    width = 0.8 / max(1, len(agents))
    for g, env_id in enumerate(envs):
        for row in (r for r in rows if r["env_id"] == env_id):
            x = g + (agents.index(row["agent"]) - (len(agents) - 1) / 2) * width
            error = [[row["mean"] - row["ci_low"]], [row["ci_high"] - row["mean"]]]
            ax.bar(
                x,
                row["mean"],
                width * 0.9,
                yerr=error,
                capsize=2,
                color=AGENT_COLORS[row["agent"]],
                hatch="//" if row["agent"] == "greedy" else None,
                edgecolor="white" if row["agent"] == "greedy" else None,
            )
            if row["agent"] == "greedy":  # the level every learner is measured against
                ax.hlines(row["mean"], g - 0.45, g + 0.45, colors="black", linestyles="--", lw=1)
    names = [e.split("/")[-1] + (f"\n({metrics[e]})" if e in metrics else "") for e in envs]
    ax.set_xticks(range(len(envs)), names)
    ax.set_ylabel("final test metric (95% CI)")
    ax.grid(axis="y", alpha=0.3)
    legend(fig, agents, bars=True, caption=caption)
    bars = out / "final_metrics.png"
    fig.savefig(bars, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [curves, bars]


def legend(fig, agents: list[str], bars: bool = False, caption: str | None = None) -> None:
    """One legend for the whole figure, below the axes: every agent in its colour, greedy and
    random in their line styles (``bars``: as the bar chart draws them, greedy hatched); the
    ``caption`` line under it."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Patch(
            facecolor=AGENT_COLORS[a],
            hatch="//" if a == "greedy" else None,
            edgecolor="white" if a == "greedy" else None,
            label=a,
        )
        for a in agents
    ]
    if not bars:
        handles = [
            Line2D(
                [],
                [],
                color=AGENT_COLORS[a],
                linestyle=BASELINE_STYLE.get(a, "-"),
                marker=None if a in BASELINE_STYLE else "o",
                label=a,
            )
            for a in agents
        ]
    fig.legend(handles=handles, loc="lower center", ncol=len(agents), bbox_to_anchor=(0.5, -0.02))
    if caption:
        fig.text(0.5, -0.07, caption, ha="center", va="top", fontsize=8, color="dimgray")
    fig.tight_layout(rect=(0, 0.08, 1, 1))


def figure_caption(rows: list[dict], versions: dict | None, date: str | None = None) -> str:
    """The line under a figure: seeds per cell, the commit and the date it ran."""
    import time

    seeds = sorted({r["seeds"] for r in rows})
    seed_text = f"{seeds[0]} seeds" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]} seeds"
    commit = (versions or {}).get("commit") or "unknown commit"
    date = date or time.strftime("%Y-%m-%d")
    return f"{seed_text} per cell, mean and 95% CI; commit {commit}; {date}"
