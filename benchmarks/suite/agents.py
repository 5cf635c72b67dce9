"""The suite's agents: ONE registry entry each (:data:`REGISTRY`): its name, its colour in every
figure, which envs it acts on, which agents its results are paired with, whether the main job runs
it, how long its cells take (the order cells start in), and the runner that trains it and records
its learning curve. Adding an agent to the suite is adding an entry here.

A runner takes a :class:`~benchmarks.suite.cells.Cell` (the agent, env, seed, budget, the cell's
env keyword arguments and its ``record`` of a learning-curve point) and returns the steps it
trained for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import textenvs
from benchmarks.suite.settings import (
    LAST_BLOCK,
    PRIOR_LEARNING_RATES,
    TOKEN_GROUP_SIZE,
    TOKEN_GROUPS,
    TOKEN_NLPO,
    TOKEN_PROMPTS_PER_ROLLOUT,
    TRANSLATE_TOKEN_PPO,
    steps_on,
    task_of,
    token_ppo_settings,
)

BASELINES = ("random", "greedy")


@dataclass(frozen=True)
class SuiteAgent:
    """One agent of the suite."""

    name: str
    color: str
    """Its colour in every figure (matplotlib's tab10; the baselines in greys)."""
    run: Callable
    """``run(cell) -> steps``: train on the cell's env, ``cell.record`` each evaluation."""
    acts_on: str = "any"
    """``"any"``, ``"masked"`` (envs with ``action_masks()``: MaskablePPO) or ``"unmasked"``
    (generation envs: the actions are tokens)."""
    paired_with: tuple[str, ...] = BASELINES
    """The agents whose per-sample results its own are differenced with (same seed, sample)."""
    main_job: bool = False
    """Run by the main job unless ``--agents`` says otherwise."""
    duration_rank: int = 0
    """Its cells' length in the main job, longest first (0): the order cells start in."""
    line_style: str | None = None
    """An agent that does not train: its one evaluation drawn as a level line of this style."""

    def applies(self, masked_env: bool) -> bool:
        return self.acts_on == "any" or (self.acts_on == "masked") == masked_env


# -- runners -------------------------------------------------------------------------------------
def run_baseline(cell, greedy: bool) -> int:
    """``greedy``: the LM's top token (top-k mode), on flattened edits stop (keep the draft);
    else uniform over the valid actions."""
    env = cell.test_env()
    rng = np.random.default_rng(cell.seed)
    n = getattr(env, "single_action_space", env.action_space).n

    def policy(obs, mask):
        if greedy:
            return 0
        return int(rng.choice(np.flatnonzero(mask))) if mask is not None else int(rng.integers(n))

    cell.record(0, policy, env)
    return 0


def run_qlearning(cell) -> int:
    """Tabular Q-learning over hashed hidden states; the LM's preference breaks ties."""
    from agents.qlearning import QLearning, QLearningConfig, make_tabular_env

    budget, env_id, seed = cell.budget, cell.env_id, cell.seed
    rest = {k: v for k, v in cell.kwargs.items() if k not in ("k", "token_mode")}  # set by it
    train = make_tabular_env(env_id, "train", budget.k, "hash", 6, 64, seed, n_fit=256, **rest)
    # the LM's preference breaks ties: its log-probabilities of the candidates, or on an edit env
    # stop (keep its draft), so unvisited states act as the greedy LM
    learner = QLearning(train, QLearningConfig(seed=seed, lm_prior=0.01))
    if textenvs.is_edit_env(env_id):  # the tabular test env: its observations are states
        env = make_tabular_env(env_id, "test", budget.k, "hash", 6, 64, seed, fitted=train, **rest)
        state = int
    else:  # the test split through a batched vector env, each observation mapped by the map
        env, state = cell.test_env(), train.observation  # fitted on the train split
    # its own tie-break generator: evaluating between training chunks changes no training step
    tie_break = np.random.default_rng(seed + 1_000_003)
    greedy = lambda obs, mask, sub: learner.act(state(obs), 0.0, mask, sub, tie_break)  # noqa: E731
    if budget.eval_start:
        cell.record(0, greedy, env, with_env=True)
    steps = steps_on(budget, "q_steps", env_id)
    learner.learn(
        steps,
        callback=lambda s: cell.record(s, greedy, env, with_env=True),
        callback_every=max(1, steps // budget.eval_points),
    )
    return steps


def sb3_setup(cell, algo: str, policy: str) -> tuple:
    """``(config, env kwargs, train env kwargs, total steps)`` of an SB3 cell: what
    :func:`run_sb3` trains and what :mod:`benchmarks.suite.commands` writes as a command line."""
    from agents import sb3

    budget, env_id = cell.budget, cell.env_id
    config = sb3.SB3Config(
        algo=algo,
        policy=policy,
        num_envs=budget.num_envs,
        seed=cell.seed,
        n_steps=32,
        batch_size=64,
    )
    kwargs = {**cell.kwargs, **sb3.policy_env_kwargs(policy, env_id)}
    train_kwargs = kwargs
    if policy == "lm_prior":
        config.learning_rate = PRIOR_LEARNING_RATES[algo]
        total = steps_on(budget, "prior_steps", env_id)
    elif policy == "last_block":
        from agents.last_block import fitting_positions

        config.learning_rate = LAST_BLOCK["learning_rate"]
        config.gae_lambda = LAST_BLOCK["gae_lambda"]
        config.kl_coef = LAST_BLOCK["kl_coef"]
        config.policy_kwargs = {"prior_temperature": LAST_BLOCK["prior_temperature"]}
        kwargs["k"] = LAST_BLOCK["k"]
        kwargs["context_positions"] = fitting_positions(env_id, **kwargs)
        if task_of(env_id, cell.extra) == "translate":
            train_kwargs = {**kwargs, "reward": TRANSLATE_TOKEN_PPO["reward"]}
        total = budget.last_block_steps
    else:
        total = budget.ppo_steps
    return config, kwargs, train_kwargs, total


def run_sb3(cell, algo: str, policy: str) -> int:
    """SB3 PPO / MaskablePPO with ``policy`` (``mlp``, ``lm_prior``, ``last_block``)."""
    from agents import sb3

    budget, env_id = cell.budget, cell.env_id
    config, kwargs, train_kwargs, total = sb3_setup(cell, algo, policy)
    model = sb3.build(env_id, config, **train_kwargs)
    env = cell.test_env(kwargs)  # the native space the SB3 model acts in
    act = sb3.deterministic_policy(model)
    if budget.eval_start:
        cell.record(0, act, env)
    per_point = total // budget.eval_points
    for point in range(budget.eval_points):
        model.learn(per_point, reset_num_timesteps=False, callback=sb3.train_callbacks(config))
        cell.record((point + 1) * per_point, act, env)
    return total


def token_config(cell, estimator: str, extra_config: dict):
    """The :class:`~agents.token_ppo.TokenPPOConfig` of a token-trainer cell (what
    :func:`run_token` trains and :mod:`benchmarks.suite.commands` writes as a command line)."""
    from agents.token_ppo import TokenPPOConfig

    return TokenPPOConfig(
        estimator=estimator,
        env_id=cell.env_id,
        model=cell.model,
        seed=cell.seed,
        max_new_tokens=cell.kwargs["max_steps"],
        eval_samples=cell.budget.eval_samples,
        env_kwargs=dict(cell.extra or {}),
        **token_ppo_settings(cell.budget, task_of(cell.env_id, cell.extra), extra_config),
    )


def run_token(cell, estimator: str, extra_config: dict) -> int:
    """The token trainer (the LM is the policy) with ``estimator`` and the suite's settings;
    each point of its curve is greedy decoding of the current policy."""
    from agents.token_ppo import TokenPPO

    budget = cell.budget
    trainer = TokenPPO(token_config(cell, estimator, extra_config))
    steps = 0
    if budget.eval_start:
        cell.record_greedy(0, trainer)
    per_point = max(1, trainer.iterations // budget.eval_points)
    while trainer.iteration < trainer.iterations:
        history = trainer.train(progress=False, stop_after=per_point)
        steps = sum(h["tokens"] for h in history)
        cell.record_greedy(steps, trainer)
    return steps


# -- the registry --------------------------------------------------------------------------------


def _group(name: str) -> dict:
    """A group estimator's own settings: groups of TOKEN_GROUP_SIZE completions of
    TOKEN_PROMPTS_PER_ROLLOUT prompts a rollout, and its tuned settings (TOKEN_GROUPS)."""
    size = {"group_size": TOKEN_GROUP_SIZE}
    return {**size, "num_envs": TOKEN_PROMPTS_PER_ROLLOUT * TOKEN_GROUP_SIZE, **TOKEN_GROUPS[name]}


_WITH_TOKEN_PPO = (*BASELINES, "token_ppo")  # the other token agents: the same trainer


def _group_agent(name: str, colour: str, estimator: str, preset: str, duration_rank: int):
    """A token agent with a group estimator at its own settings (``TOKEN_GROUPS[preset]``)."""
    return SuiteAgent(
        name,
        colour,
        functools.partial(run_token, estimator=estimator, extra_config=_group(preset)),
        acts_on="unmasked",
        paired_with=_WITH_TOKEN_PPO,
        duration_rank=duration_rank,
    )


REGISTRY: dict[str, SuiteAgent] = {
    a.name: a
    for a in (
        SuiteAgent(
            "random",
            "#7f7f7f",
            functools.partial(run_baseline, greedy=False),
            main_job=True,
            duration_rank=10,
            line_style=":",
        ),
        SuiteAgent(
            "greedy",
            "#000000",
            functools.partial(run_baseline, greedy=True),
            main_job=True,
            duration_rank=11,
            line_style="--",
        ),
        SuiteAgent("qlearning", "#1f77b4", run_qlearning, main_job=True, duration_rank=9),
        SuiteAgent(
            "ppo",
            "#ff7f0e",
            functools.partial(run_sb3, algo="ppo", policy="mlp"),
            acts_on="unmasked",
            duration_rank=8,
        ),
        SuiteAgent(
            "ppo_prior",
            "#2ca02c",
            functools.partial(run_sb3, algo="ppo", policy="lm_prior"),
            acts_on="unmasked",
            main_job=True,
            duration_rank=7,
        ),
        SuiteAgent(
            "ppo_last_block",
            "#8c564b",
            functools.partial(run_sb3, algo="ppo", policy="last_block"),
            acts_on="unmasked",
            duration_rank=0,
        ),
        SuiteAgent(
            "maskable_ppo",
            "#9467bd",
            functools.partial(run_sb3, algo="maskable_ppo", policy="mlp"),
            acts_on="masked",
            duration_rank=6,
        ),
        SuiteAgent(
            "maskable_prior",
            "#d62728",
            functools.partial(run_sb3, algo="maskable_ppo", policy="lm_prior"),
            acts_on="masked",
            main_job=True,
            duration_rank=5,
        ),
        SuiteAgent(
            "token_ppo",
            "#e377c2",
            functools.partial(run_token, estimator="gae", extra_config={}),
            acts_on="unmasked",
            main_job=True,
            duration_rank=1,
        ),
        _group_agent("token_grpo", "#17becf", "grpo", "grpo", duration_rank=2),
        _group_agent("token_rloo", "#bcbd22", "rloo", "rloo", duration_rank=3),
        _group_agent("token_grpo_to_go", "#9edae5", "grpo", "grpo_to_go", duration_rank=2),
        _group_agent("token_rloo_to_go", "#dbdb8d", "rloo", "rloo_to_go", duration_rank=3),
        SuiteAgent(
            "token_nlpo",
            "#393b79",
            functools.partial(run_token, estimator="gae", extra_config=dict(TOKEN_NLPO)),
            acts_on="unmasked",
            paired_with=_WITH_TOKEN_PPO,
            duration_rank=4,
        ),
    )
}

AGENTS = tuple(REGISTRY)
"""Every suite agent, in the order of the tables and figures."""
DEFAULT_AGENTS = tuple(a.name for a in REGISTRY.values() if a.main_job)
EXPECTED_ORDER = tuple(sorted(AGENTS, key=lambda name: REGISTRY[name].duration_rank))
"""The agents from the longest cell to the shortest (main job, 2-core CPU): the order cells
start in."""
AGENT_COLORS = {name: a.color for name, a in REGISTRY.items()}
BASELINE_STYLE = {name: a.line_style for name, a in REGISTRY.items() if a.line_style}


def applies(agent: str, env_id: str) -> bool:
    """Whether ``agent`` runs on ``env_id``: MaskablePPO where the env offers action masks, PPO
    and the token agents where it does not (their actions are tokens)."""
    from agents.sb3 import default_algo

    return REGISTRY[agent].applies(default_algo(env_id) == "maskable_ppo")
