"""The benchmark suite, the project's main job: agents x environments x seeds, tables and plots.

``python -m benchmarks.run`` (or ``textenvs-bench``) runs every agent on Summarize, Translate and
EditSummary for 3 seeds on all 200 test samples, two cells at a time (under 10 minutes on 2 CPU
cores with the tiny model); ``--quick`` is a smoke run with small budgets and 32 test samples,
``--full`` uses 5 seeds and larger budgets. Each cell (agent, env, seed) trains with a fixed step
budget and evaluates the greedy / deterministic policy on the test split at the start
(``Budget.eval_start``) and at ``eval_points`` evenly spaced points, giving a learning curve (task
metric vs environment steps; the main job: five points per run). The run ends with one sentence
naming the agents that beat the greedy LM and by how much.

Agents: ``random`` (uniform over valid actions) and ``greedy`` (the LM's top token; for edit envs,
stop on the LM's draft) as baselines, ``qlearning`` (tabular, hashed hidden states), ``ppo`` (SB3
with an MLP policy, generation envs), ``ppo_prior`` (SB3 PPO with
:class:`agents.lm_prior.LMPriorPolicy`: starts at the LM), ``ppo_last_block`` (SB3 PPO with
:class:`agents.last_block.LastBlockPolicy`, a trainable copy of the LM's last block with token PPO's
KL penalty; not in the main job: ``--full --agents ppo_last_block``), ``maskable_ppo``
(sb3-contrib, envs with
``action_masks()``: editing), ``maskable_prior`` (MaskablePPO with
:class:`agents.edit_prior.EditPriorPolicy`: starts at the LM's draft), ``token_ppo`` (the LM is the
policy, generation envs). An agent that does not apply to an env is skipped. Agents see the envs
through the Gymnasium API and the env -> agent contract only (``info["metric"]``,
``action_masks()``, the documented keyword arguments).

Every evaluation plays the first ``eval_samples`` test samples in order, so two agents' results
are paired by sample: the table gives each agent's mean test metric with a 95% CI from a
hierarchical bootstrap (resample seeds, then test samples within each seed) and its difference to
the random and greedy baselines with a paired hierarchical bootstrap CI.

Writes to ``--out`` (default ``results/bench``): ``cells.jsonl`` (one raw record per finished cell,
so Ctrl-C keeps them and ``--resume`` skips them), ``results.json`` (every raw figure, the config,
versions, and with ``--throughput`` this machine's throughput figures), ``table.md``,
``learning_curves.png`` and ``final_metrics.png``.

``--seeds 5 --agents random greedy qlearning ppo maskable_ppo --q-steps 24000 --ppo-steps 32000
--eval-samples 200 --eval-points 1`` is the long agents-versus-baselines comparison of the README.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import gymnasium as gym

import textenvs
from benchmarks.suite.agents import (  # noqa: F401  (the suite's names, importable from here)
    AGENT_COLORS,
    AGENTS,
    BASELINE_STYLE,
    DEFAULT_AGENTS,
    EXPECTED_ORDER,
    REGISTRY,
    applies,
)
from benchmarks.suite.cells import EVAL_ENVS, evaluate, run_cell, test_env  # noqa: F401
from benchmarks.suite.output import (  # noqa: F401
    LOCK_NAME,
    check_recorded_run,
    load_cells,
    lock_output_folder,
    recorded_settings,
    versions,
)
from benchmarks.suite.report import figure_caption, markdown_table, plot, text_table, verdict
from benchmarks.suite.settings import (  # noqa: F401
    DEFAULT_ENVS,
    DIALOGUE,
    EDIT_BUDGETS,
    LAST_BLOCK,
    PRESETS,
    TOKEN_PPO,
    TRANSLATE_TOKEN_PPO,
    Budget,
    env_kwargs,
    horizon,
    metric_label,
    steps_on,
    task_of,
    token_ppo_settings,
)
from benchmarks.suite.stats import (  # noqa: F401
    aggregate,
    bootstrap_ci,
    final_per_sample,
    hierarchical_bootstrap,
    iqm,
)
from textenvs.cli import CommandLineError, float_arg, int_arg, json_object, run_cli
from textenvs.rewards import METRIC_NAMES


def throughput_figures(model: str) -> dict:
    from benchmarks import throughput

    args = [
        "--json",
        "--model",
        model,
        "--episodes",
        "2",
        "--episode-length",
        "32",
        "--edit-steps",
        "30",
        "--vector-episodes",
        "1",
        "--memory-steps",
        "1000",
    ]
    return throughput.measure(throughput.parse_args(args))


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, checked: ids registered, agents of the registry, token-PPO fields the suite
    leaves to the user."""
    p = argparse.ArgumentParser(description="The textenvs benchmark suite (the main job).")
    _run_flags(p)
    _budget_flags(p)
    args = p.parse_args(argv)
    if args.dialogue:  # the preset's envs, agents, model and env arguments, under the user's
        args.env_kwargs = {**DIALOGUE["env_kwargs"], **args.env_kwargs}
    args.env_id = args.env_id or list(DIALOGUE["env_ids"] if args.dialogue else DEFAULT_ENVS)
    args.agents = args.agents or list(DIALOGUE["agents"] if args.dialogue else DEFAULT_AGENTS)
    args.model = args.model or (DIALOGUE["model"] if args.dialogue else textenvs.TINY)
    textenvs_ids = [i for i in gym.registry if i.startswith("textenvs/")]
    for env_id in args.env_id:
        if env_id not in gym.registry:
            p.error(
                f"unknown env id {env_id!r}; registered textenvs ids: {', '.join(textenvs_ids)}"
            )
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    check_token_ppo_config(p, args.token_ppo_config)
    for agent in args.agents:
        if agent not in AGENTS:
            p.error(f"unknown agent {agent!r}; valid agents: {', '.join(AGENTS)}")
    return args


def _run_flags(p: argparse.ArgumentParser) -> None:
    """What runs where: the preset, envs, agents, model, env arguments, jobs, the output."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="a smoke run: small budgets, 32 test samples"
    )
    mode.add_argument("--full", action="store_true", help="5 seeds, larger budgets")
    mode.add_argument(
        "--dialogue",
        action="store_true",
        help="the dialogue preset: random, greedy and token_ppo on textenvs/Dialogue-v0 (the "
        f"built-in multi-turn task) with {DIALOGUE['model']}, env arguments "
        f"{json.dumps(DIALOGUE['env_kwargs'])}",
    )
    p.add_argument(
        "--env-id",
        nargs="+",
        help=f"any registered textenvs id (default: {' '.join(DEFAULT_ENVS)}; with --dialogue "
        f"{' '.join(DIALOGUE['env_ids'])})",
    )
    p.add_argument(
        "--agents",
        nargs="+",
        help=f"any of {AGENTS} (default: {' '.join(DEFAULT_AGENTS)}; with --dialogue "
        f"{' '.join(DIALOGUE['agents'])})",
    )
    p.add_argument(
        "--model",
        help=f"textenvs/tiny (default; with --dialogue {DIALOGUE['model']}), a save_pretrained "
        "folder or a hub name",
    )
    p.add_argument(
        "--env-kwargs",
        type=json_object,
        default={},
        help="JSON of extra keyword arguments for every env, e.g. '{\"max_len\": 24}' (with "
        "--dialogue, over the preset's)",
    )
    p.add_argument(
        "--jobs",
        type=int_arg(),
        default=min(2, os.cpu_count() or 1),
        help="cells run at once, each in a worker process with one torch thread (1: in this "
        "process)",
    )
    p.add_argument("--out", default="results/bench")
    p.add_argument(
        "--resume", action="store_true", help="keep the finished cells in --out and run the rest"
    )
    p.add_argument("--overwrite", action="store_true", help="delete --out first")
    p.add_argument(
        "--throughput",
        action="store_true",
        help="also measure this machine's throughput figures (benchmarks/throughput.py, short "
        "settings; about 25 s) into results.json",
    )
    # the figures used to be on by default; the old switch still parses and changes nothing
    p.add_argument("--no-throughput", action="store_true", help=argparse.SUPPRESS)


def _budget_flags(p: argparse.ArgumentParser) -> None:
    """Overrides of the preset's budget (:class:`~benchmarks.suite.settings.Budget`) and of token
    PPO's settings."""
    p.add_argument("--seeds", type=int_arg(), help="override the preset's number of seeds")
    p.add_argument(
        "--scale",
        type=float_arg(0, low_open=True),
        default=1.0,
        help="multiply every training budget (tests use 0.01)",
    )
    p.add_argument(
        "--eval-samples",
        type=int_arg(),
        help="override the preset's test samples per evaluation point",
    )
    p.add_argument(
        "--eval-points",
        type=int_arg(),
        help="override the preset's evaluation points per learning curve",
    )
    p.add_argument("--q-steps", type=int_arg(), help="override the preset's Q-learning steps")
    p.add_argument(
        "--ppo-steps", type=int_arg(), help="override the preset's SB3 PPO / MaskablePPO steps"
    )
    p.add_argument(
        "--prior-steps",
        type=int_arg(),
        help="override the preset's steps of the LM-prior SB3 agents (ppo_prior, maskable_prior)",
    )
    p.add_argument(
        "--last-block-steps",
        type=int_arg(),
        help="override the preset's steps of SB3 PPO with the last-block policy (ppo_last_block)",
    )
    p.add_argument(
        "--token-ppo-episodes", type=int_arg(), help="override the preset's token-PPO episodes"
    )
    p.add_argument(
        "--token-ppo-reward",
        choices=METRIC_NAMES,
        help="token PPO's training reward (default: the env's metric, on which it is evaluated)",
    )
    p.add_argument(
        "--token-ppo-config",
        type=json_object,
        default={},
        help="JSON of agents.token_ppo.TokenPPOConfig fields for token PPO, over the suite's "
        f"({', '.join(f'{k} {v}' for k, v in TOKEN_PPO.items())}; on translation also "
        f"{', '.join(f'{k} {v}' for k, v in TRANSLATE_TOKEN_PPO.items())}), e.g. "
        "'{\"num_epochs\": 1}'",
    )


# TokenPPOConfig fields the suite sets per cell (the env, model, seed, episode length and budget)
SUITE_TOKEN_PPO_FIELDS = (
    "env_id",
    "model",
    "seed",
    "reward",
    "max_new_tokens",
    "total_episodes",
    "eval_samples",
)


def check_token_ppo_config(p: argparse.ArgumentParser, config: object) -> None:
    """``--token-ppo-config`` must be a JSON object of TokenPPOConfig fields the suite leaves
    free."""
    import dataclasses

    from agents.token_ppo import TokenPPOConfig

    free = sorted(
        {f.name for f in dataclasses.fields(TokenPPOConfig)} - set(SUITE_TOKEN_PPO_FIELDS)
    )
    if not isinstance(config, dict):
        p.error(f"--token-ppo-config must be a JSON object, got {config!r}")
    unknown = sorted(set(config) - set(free))
    if unknown:
        p.error(
            f"--token-ppo-config: {unknown} cannot be set there (the suite sets "
            f"{', '.join(SUITE_TOKEN_PPO_FIELDS)}; --token-ppo-reward sets the reward); valid "
            f"fields: {', '.join(free)}"
        )
    try:
        TokenPPOConfig(**config).validate()
    except (TypeError, ValueError) as e:
        p.error(f"--token-ppo-config: {e}")


def budget_for(args: argparse.Namespace) -> Budget:
    preset = (
        "full"
        if args.full
        else "quick"
        if args.quick
        else "dialogue"
        if args.dialogue
        else "default"
    )
    budget = Budget(**asdict(PRESETS[preset]))
    for name in (
        "seeds",
        "eval_samples",
        "eval_points",
        "q_steps",
        "ppo_steps",
        "prior_steps",
        "last_block_steps",
        "token_ppo_episodes",
        "token_ppo_reward",
        "token_ppo_config",
    ):
        if getattr(args, name):
            setattr(budget, name, getattr(args, name))
    budget.prior_steps = budget.prior_steps or budget.ppo_steps
    budget.last_block_steps = budget.last_block_steps or budget.prior_steps
    if args.token_ppo_episodes:  # the run's own count holds on every env
        budget.translate_token_ppo_episodes = 0
    for name in EDIT_BUDGETS:  # the run's own count holds on every env
        if getattr(args, name):
            setattr(budget, f"edit_{name}", 0)
    for name in ("q_steps", "ppo_steps", "prior_steps", "last_block_steps", "token_ppo_episodes"):
        setattr(budget, name, max(1, int(getattr(budget, name) * args.scale)))
    if budget.translate_token_ppo_episodes:
        budget.translate_token_ppo_episodes = max(
            4, int(budget.translate_token_ppo_episodes * args.scale)
        )
    for name in (f"edit_{name}" for name in EDIT_BUDGETS):
        if getattr(budget, name):
            setattr(budget, name, max(1, int(getattr(budget, name) * args.scale)))
    if args.scale < 1:
        floor = budget.num_envs * 32 * budget.eval_points  # one SB3 rollout a point
        budget.ppo_steps = max(budget.ppo_steps, floor)
        budget.prior_steps = max(budget.prior_steps, floor)
        budget.last_block_steps = max(budget.last_block_steps, floor)
        if budget.edit_prior_steps:
            budget.edit_prior_steps = max(budget.edit_prior_steps, floor)
        budget.token_ppo_episodes = max(budget.token_ppo_episodes, 4)
    return budget


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_cells(todo: list[tuple], budget: Budget, args: argparse.Namespace, keep) -> None:
    """Run the cells, ``args.jobs`` at a time, handing each finished cell to ``keep`` at once.

    With more than one job every cell runs in a worker process with one torch thread (a cell is
    seeded on its own, so its result does not depend on which worker runs it or when); a tiny
    model's forward gains little from a second thread, so two one-thread jobs do nearly twice the
    work of one two-thread job on 2 cores.
    """
    if args.jobs <= 1:
        for agent, env_id, seed in todo:
            keep(run_cell(agent, env_id, seed, budget, args.model, args.env_kwargs))
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_one_thread) as pool:
        pending = {
            pool.submit(run_cell, a, e, s, budget, args.model, args.env_kwargs) for a, e, s in todo
        }
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    keep(future.result())
        except KeyboardInterrupt:
            for future in pending:
                future.cancel()
            raise


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    budget = budget_for(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # held until the run ends, however it ends: closing the handle releases the lock at once (a
    # lock left to the garbage collector can outlive the call, and a second run in the same
    # process would then find its own folder "in use")
    with lock_output_folder(out):
        return run_suite(args, budget, out)


def run_suite(args: argparse.Namespace, budget: Budget, out: Path) -> dict:
    """The run of :func:`main` once ``out`` is locked."""
    from tqdm import tqdm

    if any(p.name != LOCK_NAME for p in out.iterdir()) and not (args.resume or args.overwrite):
        raise CommandLineError(
            f"{out} exists and is not empty: pass --resume to keep its finished cells or "
            "--overwrite to start over."
        )
    if args.overwrite:
        for p in out.iterdir():
            if p.name != LOCK_NAME:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    recorded = recorded_settings(budget, args)
    check_recorded_run(out / "run.json", recorded)
    raw = out / "cells.jsonl"
    cells = load_cells(raw)
    done = {(c["agent"], c["env_id"], c["seed"]) for c in cells}
    todo = [
        (a, e, s)
        for e in args.env_id
        for s in range(budget.seeds)
        for a in args.agents
        if applies(a, e) and (a, e, s) not in done
    ]
    # the longest cells first (the learners, by their last measured wall time), so that no
    # worker starts a long cell while the other has nothing left
    todo.sort(key=lambda cell: EXPECTED_ORDER.index(cell[0]))
    start = time.time()
    interrupted = False
    with tqdm(total=len(todo) + len(done), initial=len(done), desc="suite", unit="cell") as bar:

        def keep(cell: dict) -> None:
            cells.append(cell)
            with raw.open("a") as f:
                f.write(json.dumps(cell) + "\n")
            bar.set_postfix_str(f"{cell['agent']} {cell['env_id'].split('/')[-1]} done")
            bar.update()

        try:
            run_cells(todo, budget, args, keep)
        except KeyboardInterrupt:
            interrupted = True
            print(
                f"\ninterrupted: {len(cells)} finished cells kept in {raw}; rerun with --resume",
                file=sys.stderr,
            )
    # the table and plots list the envs as asked and the agents in AGENTS order, whatever order
    # the cells finished in
    order = {e: i for i, e in enumerate(args.env_id)}
    cells.sort(
        key=lambda c: (order.get(c["env_id"], len(order)), AGENTS.index(c["agent"]), c["seed"])
    )
    rows = aggregate(cells)
    report = {
        "config": {**vars(args), **recorded},
        "cells": cells,
        "rows": rows,
        "wall_s": round(
            time.time() - start, 1
        ),  # this invocation (a --resume run only counts its own cells)
        "cells_wall_s": round(sum(c["wall_s"] for c in cells), 1),
        "interrupted": interrupted,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": sys.version.split()[0],
        },
        "versions": versions(),
    }
    if args.throughput and not interrupted:
        report["throughput"] = throughput_figures(args.model)
    write_report(report, out)
    if interrupted:
        raise SystemExit(130)
    return report


def write_report(report: dict, out: Path) -> None:
    """``results.json``, ``table.md`` and the plots into ``out``; the table and the verdict
    printed."""
    cells, rows = report["cells"], report["rows"]
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "table.md").write_text(markdown_table(rows) + "\n")
    texts = text_table(rows)
    if texts:
        (out / "text_stats.md").write_text(texts + "\n")
    figures = []
    if cells:
        extra = report["config"].get("env_kwargs") or {}
        envs = dict.fromkeys(c["env_id"] for c in cells)
        metrics = {e: metric_label(e, extra) for e in envs}
        caption = figure_caption(rows, report.get("versions"))
        figures = plot(cells, rows, out, metrics, caption)
    files = [out / "results.json", out / "table.md", *figures]
    print(markdown_table(rows))
    print(verdict(rows))
    if texts:
        print(texts)
        files.insert(2, out / "text_stats.md")
    for f in files:
        print(f"wrote {f}")


def cli() -> None:
    """The console script: a user error as one line (:func:`textenvs.cli.run_cli`)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
