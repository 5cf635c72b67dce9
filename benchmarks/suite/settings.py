"""The suite's settings as data: the budgets of a cell (:class:`Budget`), the presets
(``--quick``, the default main job, ``--full``), the settings of the agents that need their own,
and the ONE function that builds every cell's env keyword arguments (:func:`env_kwargs`), which
the runners only add to.

How each setting was chosen (the runs, seeds and figures) is in ``docs/results.md``, "Tuning
history", not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym

import textenvs

DEFAULT_ENVS = ("textenvs/Summarize-v0", "textenvs/Translate-v0", "textenvs/EditSummary-v0")
# The dialogue preset (--dialogue): the built-in multi-turn task on the built-in chat model, its
# agents and its env arguments (a user's --env-kwargs go over these)
DIALOGUE = {
    "env_ids": ("textenvs/Dialogue-v0",),
    "agents": ("random", "greedy", "token_ppo"),
    "model": "textenvs/tiny-chat",
    "env_kwargs": {"max_turn_tokens": 10, "max_turns": 4, "chat_template": True},
}
# Token PPO in the suite: 32 episodes a rollout, 4 PPO epochs of 16 at lr 3e-4, tokens sampled at
# temperature 0.5, GAE lambda 0.5.
TOKEN_PPO = {
    "num_epochs": 4,
    "minibatch_size": 16,
    "learning_rate": 3e-4,
    "temperature": 0.5,
    "gae_lambda": 0.5,
}
# Translation trains on chrF (evaluated on the env's BLEU like every agent), KL coefficient 0.05.
TRANSLATE_TOKEN_PPO = {"reward": "chrf", "kl_coef": 0.05}
# SB3 PPO with agents.last_block.LastBlockPolicy ("ppo_last_block"): token PPO's setup inside
# stock PPO (the LM at temperature 0.5, its KL in the reward, GAE lambda 0.5), k 8.
LAST_BLOCK = {
    "learning_rate": 1e-4,
    "gae_lambda": 0.5,
    "kl_coef": 0.05,
    "prior_temperature": 0.5,
    "k": 8,
}
# The token-level agents beside PPO: groups of TOKEN_GROUP_SIZE completions of one prompt; NLPO
# (Ramamurthy et al. 2023) samples inside the top-p nucleus of a masking policy refreshed every
# nlpo_mu iterations (RL4LMs' top_mask 0.9; mu shorter for the suite's short runs).
TOKEN_GROUP_SIZE = 4
TOKEN_NLPO = {"nlpo_top_p": 0.9, "nlpo_mu": 5}
# Every token agent sees the same distinct prompts per rollout: PPO 32 episodes of 32 prompts,
# the group estimators 32 prompts x TOKEN_GROUP_SIZE completions (the same 4 epochs of 16 then
# make as many gradient steps per episode).
TOKEN_PROMPTS_PER_ROLLOUT = 32
# The group estimators' own learning rates, each the best of 1e-4, 3e-4 and 1e-3 on the validation
# split at the main job's 768 episodes, 2 seeds (python -m benchmarks.estimator_grid;
# benchmarks/latest/estimator_grid.json): PPO's 3e-4 stays; GRPO and RLOO 1e-4; with per-token
# credit (group_credit="to_go") both 3e-4.
TOKEN_GROUPS = {
    "grpo": {"learning_rate": 1e-4},
    "rloo": {"learning_rate": 1e-4},
    "grpo_to_go": {"learning_rate": 3e-4, "group_credit": "to_go"},
    "rloo_to_go": {"learning_rate": 3e-4, "group_credit": "to_go"},
}
# SB3 with the LM-prior policies: a learning rate per policy (docs/results.md, "Tuning history")
PRIOR_LEARNING_RATES = {"ppo": 3e-4, "maskable_ppo": 1e-3}


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
    # to 17), so an 8-token episode caps BLEU by its brevity penalty
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
    # tabular Q-learning's steps on edit envs (0: q_steps); docs/results.md, "Tuning history"
    edit_q_steps: int = 0
    # MaskablePPO with the LM prior on edit envs (0: prior_steps); docs/results.md, "Tuning history"
    edit_prior_steps: int = 0
    # SB3 PPO with the last-block policy (0: prior_steps); not a main-job agent (49,152 steps:
    # about 4 minutes a seed, two one-thread jobs on 2 CPU cores)
    last_block_steps: int = 0
    k: int = 4
    num_envs: int = 8


PRESETS = {
    # The main job: under 10 min on 2 CPU cores; 3 seeds x all 200 test samples, paired (why 3:
    # docs/results.md, "Tuning history").
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
    # --dialogue: token PPO against the greedy LM on textenvs/Dialogue-v0 (4 turns of at most 10
    # tokens: a 40-token horizon), 3 seeds x all 100 test conversations, paired
    "dialogue": Budget(
        seeds=3,
        q_steps=1500,
        ppo_steps=2048,
        token_ppo_episodes=2048,
        eval_points=4,
        eval_samples=100,
        horizon=40,
        translate_horizon=40,
        # at 3e-4 a PPO update moved the policy by 0.2-1.5 nats (approx_kl) and one seed of two
        # collapsed into one-token answers at 4,096 conversations; at 1e-4 both rose (results)
        token_ppo_config={"learning_rate": 1e-4},
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


def token_ppo_settings(budget: Budget, task: str | None, agent: dict | None = None) -> dict:
    """TokenPPOConfig fields of a token-trainer cell: the suite's (32 prompts a rollout), then
    the translation settings on translation tasks, then the agent's own (``agent``: a group
    estimator's group size, rollout size and tuned settings), then the run's
    ``token_ppo_reward`` and ``token_ppo_config``."""
    episodes = budget.token_ppo_episodes
    if task == "translate":
        episodes = budget.translate_token_ppo_episodes or episodes
    settings = {"num_envs": TOKEN_PROMPTS_PER_ROLLOUT, **TOKEN_PPO}
    if task == "translate":
        settings.update(budget.translate_token_ppo)
    settings.update(agent or {})
    if budget.token_ppo_reward is not None:
        settings["reward"] = budget.token_ppo_reward
    settings.update(budget.token_ppo_config)
    group = settings.get("group_size", 1)
    room = max(group, episodes // group * group)  # a small budget's rollouts shrink to fit it
    settings["num_envs"] = min(settings["num_envs"], room)
    return {"total_episodes": episodes, **settings}


def env_kwargs(budget: Budget, model: str, env_id: str, extra: dict | None = None) -> dict:
    """The same keyword arguments for every env id (the knob names are shared by both env kinds)."""
    return {
        "model": model,
        "token_mode": "topk",
        "k": budget.k,
        "max_steps": horizon(budget, env_id, extra),
        **(extra or {}),
    }


METRIC_LABELS = {
    "rougeL": "ROUGE-L",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "bleu": "BLEU",
    "chrf": "chrF",
    "bertscore": "BERTScore",
    "classifier": "classifier score",
}


def metric_label(env_id: str, extra: dict | None = None) -> str:
    """The name of the test metric an id is scored with (the run's ``reward``, else its task's
    default), as a figure's axis says it: ``ROUGE-L``, ``BLEU``, ..."""
    from textenvs.tasks.builtin import _DEFAULT_REWARDS
    from textenvs.tasks.hub import BENCHMARKS, DIALOGUE_BENCHMARKS

    kwargs = {**gym.spec(env_id).kwargs, **(extra or {})}
    name = kwargs.get("reward")
    if not isinstance(name, str):
        task = kwargs.get("task")
        bench = {**BENCHMARKS, **DIALOGUE_BENCHMARKS}.get(task)
        name = bench.default_reward if bench else _DEFAULT_REWARDS.get(task, "rougeL")
    return METRIC_LABELS.get(name, name)
