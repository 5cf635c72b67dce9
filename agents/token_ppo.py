"""Token-level PPO whose policy is the language model itself (RL4LMs / TRL style, through textenvs).

Read top to bottom: the config, the math (small pure functions), the rollout, the update, the
training loop with checkpoints and logging, the CLI.

* Policy: the causal LM; an action is a token sampled from the LM's own next-token logits. The
  rollout runs through the batched generation env (``gym.make_vec``, ``token_mode="vocab"``) whose
  model IS the policy: each generated token costs the env's one incremental forward, whose logits
  we sample from and whose observation (the final hidden state) the value head reads. No second
  computation of the same hidden state.
* Value head: one linear layer on the policy's final hidden state (one trunk, no third model).
* Reference: a frozen copy of the starting LM; its log-probs of the generated tokens come from ONE
  full-sequence forward per rollout batch. The per-token reward is the env's (dense metric) reward
  minus ``kl_coef * (log pi - log pi_ref)`` (Ziegler et al. 2019), with a fixed or adaptive
  coefficient (their proportional controller).
* Update: token-level GAE, masked advantage whitening, clipped policy loss, clipped value loss,
  entropy bonus, gradient clipping, several epochs over shuffled minibatches of episodes, a linear
  learning-rate schedule. Log-probs are recomputed once per minibatch in one full-sequence pass.

Run ``python -m agents.token_ppo --env-id textenvs/Summarize-v0 --total-episodes 4096``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib
import inspect
import json
import math
import os
import time
import types
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.utils.checkpoint
from tqdm import tqdm

import textenvs  # noqa: F401  (registers the ids)
from agents.checkpoint import (
    check_save_target,
    check_zip_sizes,
    read_json_object,
    recover,
    save_atomically,
)
from agents.common import evaluate_policy, parse_bool
from textenvs.checks import check_float, check_int, check_optional_str
from textenvs.cli import checked_arg, json_object, run_cli
from textenvs.envs.base import check_bool
from textenvs.lm import LanguageModel, quiet_loading

ESTIMATOR_CHOICES = {
    "estimator": ("gae", "grpo", "rloo"),
    "kl_placement": ("reward", "loss"),
    "kl_estimator": ("k1", "k3"),
    "ratio_level": ("token", "sequence"),
}
# the wall-clock figures of a history record (the rest is a function of the seed and the data)
TIMING_STATS = ("completions_per_s", "iteration_s", "rollout_s", "reference_s", "update_s")
# what a checkpoint must share with the run that resumes it
ESTIMATOR_FIELDS = (
    "estimator",
    "group_size",
    "kl_placement",
    "kl_estimator",
    "ratio_level",
    "nlpo_top_p",
    "nlpo_mu",
)


def _count(name: str, value) -> int:
    return check_int(name, value, 1)


def _at_least(low: float, open_: bool = False):
    return lambda name, value: check_float(name, value, low, low_open=open_)


def _unit(name: str, value) -> float:
    return check_float(name, value, 0, 1)


# Every numeric field's type and range: checked by TokenPPOConfig.validate() and by the command
# line's flags (the same message, before any work).
FIELD_CHECKS = {
    "num_envs": _count,
    "max_new_tokens": _count,
    "total_episodes": _count,
    "num_epochs": _count,
    "minibatch_size": _count,
    "group_size": _count,
    "nlpo_mu": _count,
    "kl_horizon": _count,
    "eval_samples": _count,
    "seed": lambda name, value: check_int(name, value, 0, 2**32 - 1),
    "save_every": lambda name, value: check_int(name, value, 0),
    "lora_r": lambda name, value: check_int(name, value, 0),
    "learning_rate": _at_least(0, open_=True),
    "clip_range": _at_least(0, open_=True),
    "clip_range_value": _at_least(0, open_=True),
    "temperature": _at_least(0, open_=True),
    "max_grad_norm": _at_least(0, open_=True),
    "kl_target": _at_least(0, open_=True),
    "lora_alpha": _at_least(0, open_=True),
    "vf_coef": _at_least(0),
    "ent_coef": _at_least(0),
    "kl_coef": _at_least(0),
    "gamma": _unit,
    "gae_lambda": _unit,
    "nlpo_top_p": _unit,
}


@dataclass
class TokenPPOConfig:
    """Hyper-parameters of token-level PPO."""

    env_id: str = "textenvs/Summarize-v0"
    """A generation env id (its action space must be the vocabulary)."""
    env_kwargs: dict = dataclasses.field(default_factory=dict)
    """More keyword arguments of every env the trainer makes (rollouts and evaluation), as JSON on
    the command line: a benchmark id's ``dataset_kwargs`` (local files), ``reward_kwargs`` (a
    classifier or BERTScore model), ``chat_template``, ``too_long``, ``task``, ..."""
    model: str = "textenvs/tiny"
    """The starting policy: ``textenvs/tiny``, a ``save_pretrained`` folder or a hub name."""
    reward: str | None = None
    """The env's reward metric (None: the task's default)."""
    dense: bool = True
    """Dense rewards (the metric's change every token) or the metric once at the end."""
    num_envs: int = 32
    """Episodes per rollout: sub-envs of the batched env, one episode each."""
    max_new_tokens: int = 16
    """Tokens per episode at most."""
    total_episodes: int = 4096
    """Training budget in episodes (completions)."""
    learning_rate: float = 3e-4
    """Adam learning rate at the start; annealed linearly to 0 when ``anneal_lr``."""
    anneal_lr: bool = True
    """Linear learning-rate decay over the run."""
    num_epochs: int = 4
    """PPO epochs over each rollout."""
    minibatch_size: int = 16
    """Episodes per minibatch."""
    clip_range: float = 0.2
    """PPO ratio clip epsilon."""
    clip_range_value: float = 0.2
    """Value clip: the new value stays within this of the rollout value."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    gamma: float = 1.0
    """Discount per token."""
    gae_lambda: float = 0.95
    """GAE lambda. The main job's suite uses 0.5 (``benchmarks.run.TOKEN_PPO``): with a reward paid
    every token it learned faster on Translate and Summarize (figures there and in the README)."""
    kl_coef: float = 0.02
    """Initial coefficient of the per-token KL penalty to the reference."""
    adaptive_kl: bool = False
    """Adapt ``kl_coef`` towards ``kl_target`` (Ziegler et al. 2019)."""
    kl_target: float = 2.0
    """Target KL per episode (nats) for the adaptive controller."""
    kl_horizon: int = 10_000
    """Horizon (episodes) of the adaptive controller."""
    whiten_advantages: bool = True
    """Masked whitening of advantages over the rollout's tokens (``gae`` only: the group
    estimators normalise within each group)."""
    estimator: str = "gae"
    """The advantage estimator: ``gae`` (the value head and per-token GAE: PPO), ``grpo`` (each
    episode's return normalised within its group of completions of one prompt; no value head) or
    ``rloo`` (each episode's return minus the mean of its group's others)."""
    group_size: int = 4
    """Completions per prompt for ``grpo`` / ``rloo``: consecutive sub-envs play the same sample
    (it must divide ``num_envs``)."""
    kl_placement: str = "reward"
    """Where the KL to the reference goes: ``reward`` (``kl_coef`` times each token's KL subtracted
    from its reward, PPO-RLHF's) or ``loss`` (``kl_coef`` times the mean per-token KL of the
    current policy added to the loss, TRL GRPO's)."""
    ratio_level: str = "token"
    """The importance ratio of the clipped loss: ``token`` (one per token, the loss averaged over
    the batch's tokens: PPO, GRPO with TRL's ``loss_type="bnpo"``) or ``sequence`` (one per
    completion, the loss averaged over completions: RLOO as TRL's ``RLOOTrainer``; group
    estimators only)."""
    nlpo_top_p: float = 0.0
    """NLPO (Ramamurthy et al. 2023, RL4LMs): sample only among the tokens of the masking
    policy's top-p nucleus (the log-probs of the update renormalised over the same tokens); 0
    turns it off. The masking policy is a copy of the policy, refreshed every ``nlpo_mu``
    iterations; it runs one incremental forward of its own per step."""
    nlpo_mu: int = 5
    """Iterations between refreshes of NLPO's masking policy."""
    kl_estimator: str = "k1"
    """The per-token KL estimate: ``k1`` (``log pi - log pi_ref``) or ``k3``
    (``exp(r) - r - 1``, ``r = log pi_ref - log pi``: never negative)."""
    temperature: float = 1.0
    """Sampling temperature of the rollout (1.0 samples the LM's own distribution)."""
    seed: int = 0
    """Seeds the env resets, the sampling and the minibatch order of every iteration."""
    device: str = "cpu"
    """Torch device."""
    dtype: str | None = None
    """Weights' dtype (``float32``, ``bfloat16``, ``float16``; None: the checkpoint's). A large
    model with LoRA: ``bfloat16`` base weights, the adapter stays float32 (peft's default)."""
    eval_samples: int = 200
    """Test-split samples of the greedy evaluation before and after training."""
    eval_reward: str | None = None
    """Metric of the greedy evaluation (None: the training reward), e.g. train on chrF, report BLEU.
    """
    checkpoint_dir: str | None = None
    """Where checkpoints go (None: no checkpoints)."""
    save_every: int = 0
    """Checkpoint every this many iterations (0: only at the end)."""
    tensorboard_log: str | None = None
    """TensorBoard log folder (None: no logging)."""
    lora_r: int = 0
    """LoRA rank (peft); 0 trains every weight. With LoRA the reference is the base model with the
    adapter switched off (no second copy of the weights) and checkpoints hold the adapter."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_r``)."""
    lora_target_modules: str | None = None
    """Comma-separated names of the modules LoRA adapts (None: peft's default for the model type,
    ``c_attn`` for GPT-2)."""
    mixed_precision: str = "no"
    """``no``, ``bf16`` or ``fp16`` (autocast through accelerate; fp16 needs CUDA). Under
    ``accelerate launch``, ``no`` leaves the choice to the launcher's ``--mixed_precision``."""
    fsdp: bool = False
    """Shard the parameters, gradients and optimizer states of the policy (and of the frozen
    reference) over the processes of a distributed launch with FSDP2, one unit per transformer
    block (``agents.fsdp``): full fine-tuning of a model larger than one device's memory. Each
    rollout gathers the parameters once and frees them after it; checkpoints are sharded
    (``torch.distributed.checkpoint``) and resume on the same number of processes; ``--export``
    writes the whole model. Needs ``accelerate launch`` (or ``torchrun``); bf16 or full
    precision; not with NLPO or Ray rollouts."""
    gradient_checkpointing: bool = False
    """Activation checkpointing in the update: each transformer block keeps only its input for the
    backward and runs its forward again there (:func:`checkpoint_blocks`), so the activations the
    update holds fall from every block's to about one block's, for one more forward of the blocks
    per minibatch. The gradients are the same (no dropout runs in the update). Rollouts, the
    reference pass and evaluations build no graph and run as they are. With LoRA, DDP and
    ``fsdp``."""

    def validate(self) -> None:
        for name in (
            "dense",
            "anneal_lr",
            "adaptive_kl",
            "whiten_advantages",
            "fsdp",
            "gradient_checkpointing",
        ):
            check_bool(name, getattr(self, name))
        for name, choices in ESTIMATOR_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not valid: choose one of {list(choices)}."
                )
        if self.estimator != "gae" and not (
            isinstance(self.group_size, int)
            and self.group_size >= 2
            and isinstance(self.num_envs, int)
            and self.num_envs % self.group_size == 0
        ):
            raise ValueError(
                f"estimator={self.estimator!r} needs group_size >= 2 dividing num_envs; got "
                f"group_size={self.group_size!r}, num_envs={self.num_envs!r}."
            )
        top_p_ok = isinstance(self.nlpo_top_p, (int, float)) and 0.0 <= self.nlpo_top_p <= 1.0
        if not top_p_ok or not (isinstance(self.nlpo_mu, int) and self.nlpo_mu >= 1):
            raise ValueError(
                f"nlpo_top_p must be in [0, 1] (0: off) and nlpo_mu an int >= 1; got "
                f"nlpo_top_p={self.nlpo_top_p!r}, nlpo_mu={self.nlpo_mu!r}."
            )
        if self.ratio_level == "sequence" and self.estimator == "gae":
            raise ValueError(
                "ratio_level='sequence' needs one advantage per completion: use it with "
                "estimator='grpo' or 'rloo' (GAE's advantages are per token)."
            )
        if not isinstance(self.env_kwargs, dict):
            raise ValueError(f"env_kwargs must be a dict, got {self.env_kwargs!r}.")
        for name, check in FIELD_CHECKS.items():
            check(name, getattr(self, name))
        for name in ("reward", "dtype", "eval_reward", "checkpoint_dir", "tensorboard_log"):
            check_optional_str(name, getattr(self, name))
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(
                f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}."
            )
        if self.fsdp and self.mixed_precision == "fp16":
            raise ValueError(
                "fsdp=True runs in bf16 or full precision: fp16 needs a loss scaler for sharded "
                "gradients, which this trainer does not run. Use --mixed-precision bf16."
            )
        if self.fsdp and self.nlpo_top_p:
            raise ValueError(
                "fsdp=True does not run NLPO: its masking policy is a whole copy of the policy "
                "on every process, which sharding is there to avoid. Use estimator='gae' (PPO), "
                "'grpo' or 'rloo' with --fsdp, or NLPO without it."
            )


# ---------------------------------------------------------------------------------------------
# The math: small pure functions, each tested against a hand-computed case
# ---------------------------------------------------------------------------------------------


def _local(x: torch.Tensor) -> torch.Tensor:
    """The reduction over processes when there is one process: nothing to add."""
    return x


def masked_mean(x: torch.Tensor, mask: torch.Tensor, reduce=_local) -> torch.Tensor:
    """Mean over the masked entries; ``reduce`` sums a tensor over the processes of a data-parallel
    run, which makes it the mean over every process's entries (no gradient flows through it).
    """
    return reduce((x * mask).sum()) / reduce(mask.sum()).clamp(min=1)


def masked_share(x: torch.Tensor, mask: torch.Tensor, total: torch.Tensor, world: int):
    """This process's share of the mean over the masked entries of all ``world`` processes:
    ``world * sum(x * mask) / total``, where ``total`` is the mask's sum over all processes.

    Data-parallel engines average gradients over the processes, so the averaged gradient is that of
    the global masked mean, whatever each process's token count; with one process it is
    :func:`masked_mean`.
    """
    return (x * mask).sum() / total.clamp(min=1) * world


def masked_var(x: torch.Tensor, mask: torch.Tensor, reduce=_local) -> torch.Tensor:
    """Unbiased variance over the masked entries (as TRL's ``masked_var``)."""
    mean = masked_mean(x, mask, reduce)
    n = reduce(mask.sum())
    var = masked_mean((x - mean) ** 2, mask, reduce)
    return var * n / (n - 1).clamp(min=1)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce=_local
) -> torch.Tensor:
    """``(x - mean) / std`` over the masked entries; the mean is added back when ``shift_mean`` is
    False.
    """
    mean, var = masked_mean(x, mask, reduce), masked_var(x, mask, reduce)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation per token (Schulman et al. 2016).

    Args:
        rewards, values, mask: ``(B, T)``; ``mask`` is 1 on the episode's tokens, which are a prefix
            of each row. The state after the last token is terminal (value 0).

    Returns:
        advantages and returns (advantages + values), ``(B, T)``, zero where ``mask`` is 0.
    """
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0)) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``log pi - log pi_ref`` of the sampled token: unbiased, can be negative (Schulman's k1)."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``exp(r) - r - 1`` with ``r = log pi_ref - log pi``: unbiased for KL(pi || pi_ref), never
    negative, lower variance than k1 (Schulman's k3; the per-token KL of TRL's GRPO loss)."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """NLPO's action mask: True on the smallest set of most likely tokens whose probability under
    ``logits`` ``(..., V)`` reaches ``top_p`` (the most likely token is always in)."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # the mass of the more likely tokens
    keep = before < top_p
    keep[..., 0] = True
    return torch.zeros_like(keep).scatter(-1, order, keep)


def group_advantages(returns: torch.Tensor, group_size: int, kind: str) -> torch.Tensor:
    """One advantage per episode from its group of ``group_size`` completions of one prompt.

    ``returns`` ``(B,)`` holds consecutive groups (``B`` a multiple of ``group_size``).
    ``kind="grpo"`` (Shao et al. 2024): ``(R - mean_g) / (std_g + 1e-4)``, the unbiased std of the
    group as TRL's ``GRPOTrainer``; ``kind="rloo"`` (Ahmadian et al. 2024): ``R`` minus the mean of
    the group's other ``group_size - 1`` returns.
    """
    if group_size < 2 or returns.shape[0] % group_size:
        raise ValueError(
            f"{returns.shape[0]} episodes do not make groups of {group_size} (group_size >= 2 "
            "must divide the episodes per rollout)."
        )
    groups = returns.view(-1, group_size)  # (B / G, G)
    if kind == "grpo":
        centred = groups - groups.mean(1, keepdim=True)
        return (centred / (groups.std(1, keepdim=True) + 1e-4)).reshape(-1)
    if kind == "rloo":
        others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
        return (groups - others).reshape(-1)
    raise ValueError(f"Unknown group estimator {kind!r}: choose 'grpo' or 'rloo'.")


def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    mean=masked_mean,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (to minimise) and the fraction of tokens where the clip is active.

    ``mean(x, mask)`` averages over the tokens (a :func:`masked_share` in data-parallel runs).
    """
    objective, clipped = clipped_objective(torch.exp(logp - old_logp), advantages, clip)
    return mean(objective, mask), mean(clipped, mask)


def clipped_objective(
    ratio: torch.Tensor, advantages: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate ``max(-A r, -A clip(r, 1 +- eps))`` elementwise (to minimise),
    and 1.0 where the clip is the active term."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def sequence_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    mean=masked_mean,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate on whole completions (RLOO, Ahmadian et al. 2024, as TRL's
    ``RLOOTrainer``): an episode's ratio is ``exp(sum_t (log pi - log pi_old))`` over its tokens,
    its advantage ``advantages`` ``(B,)`` one number; averaged over episodes (``mean(x, ones)``).
    Returns the loss and the fraction of episodes where the clip is active.
    """
    ratio = torch.exp(((logp - old_logp) * mask).sum(1))  # (B,)
    objective, clipped = clipped_objective(ratio, advantages, clip)
    episodes = torch.ones_like(ratio)
    return mean(objective, episodes), mean(clipped, episodes)


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    mean=masked_mean,
) -> torch.Tensor:
    """``0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2)`` averaged over the mask."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def explained_variance(
    predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, reduce=_local
) -> float:
    var = masked_var(target, mask, reduce)
    return (
        float("nan") if var == 0 else float(1 - masked_var(target - predicted, mask, reduce) / var)
    )


class AdaptiveKLController:
    """Ziegler et al. (2019): ``beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon``."""

    def __init__(self, init: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_episodes: int) -> None:
        error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + error * n_episodes / self.horizon


# ---------------------------------------------------------------------------------------------
# Rollout: whole episodes through the batched env, sampling from the env's own forward
# ---------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One batch of episodes, right-padded to ``T`` generated tokens."""

    prompts: list[list[int]]
    tokens: torch.Tensor  # (B, T) generated token ids (pad = eos)
    mask: torch.Tensor  # (B, T) 1 on generated tokens
    logprobs: torch.Tensor  # (B, T) log pi_old of each token, from the env's forward
    values: torch.Tensor  # (B, T) V(state before the token)
    env_rewards: torch.Tensor  # (B, T)
    metrics: list[float]  # the task metric of each episode
    texts: list[str]
    action_masks: torch.Tensor | None = None  # (B, T, V) NLPO: the tokens sampling could pick


def reset_groups(envs, group_size: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Reset the batched env so that each run of ``group_size`` consecutive sub-envs plays one
    sample (drawn with ``seed``): one reset, every row prefilled in one batched forward.

    Returns the observations ``(N, d)`` and the sub-envs' prompts.
    """
    n = envs.num_envs
    samples = len(envs.unwrapped.envs[0].samples)
    groups = np.random.default_rng(seed).integers(samples, size=n // group_size)
    obs, infos = envs.reset(seed=seed, options={"index": np.repeat(groups, group_size).tolist()})
    return obs, [str(p) for p in infos["prompt"]]


class NLPOMasker:
    """NLPO's masking policy: a frozen copy of the policy, refreshed every ``nlpo_mu`` iterations,
    stepped alongside the env over its own batch cache (one incremental forward per token, as the
    env's), whose top-p nucleus is the set of tokens the rollout may sample.
    """

    def __init__(self, lm: LanguageModel, n: int, top_p: float) -> None:
        # the tokenizer and settings over a frozen copy of the weights (copy.copy would not do: a
        # LanguageModel pickles, and copies, as its name, which is the process's shared model)
        self.lm = lm.with_model(copy.deepcopy(lm.model).eval().requires_grad_(False))
        self.n, self.top_p = n, top_p
        self.logits: torch.Tensor | None = None

    def refresh(self, model: torch.nn.Module) -> None:
        """The masking policy becomes the current policy."""
        self.lm.model.load_state_dict(model.state_dict())

    @torch.no_grad()
    def start(self, prompts: list[list[int]]) -> None:
        """Prefill every row's prompt; ``logits`` then holds each row's next-token logits."""
        from textenvs.batching import LockstepBatch, prefill_batch

        self.batch = LockstepBatch(self.lm, self.n)
        rows = prefill_batch(self.lm, prompts)
        for i, (seq, _, _) in enumerate(rows):
            self.batch.adopt(i, seq)
        # each row's logits at its last prompt token: (V,) or (positions, V) by the model
        last = [logits.reshape(-1, logits.shape[-1])[-1] for _, _, logits in rows]
        self.logits = torch.stack(last).float()  # (N, V)

    @torch.no_grad()
    def mask(self) -> torch.Tensor:
        """``(N, V)``: True on each row's top-p tokens."""
        return top_p_mask(self.logits, self.top_p)

    @torch.no_grad()
    def advance(self, tokens: list[int], stepping: list[int]) -> None:
        _, logits = self.batch.advance(tokens, stepping)
        self.logits = logits.float()


@torch.no_grad()
def collect_rollout(
    envs,
    value_head: torch.nn.Module,
    config: TokenPPOConfig,
    iteration: int,
    rank: int = 0,
    world: int = 1,
    masker: NLPOMasker | None = None,
) -> Rollout:
    """One episode per sub-env: a sub-env whose episode ended sits out the rest of the rollout
    (``step_unfinished``: no new episode is prefilled to be dropped). ``masker`` (NLPO): tokens
    are sampled among its top-p nucleus only.

    In a data-parallel run, process ``rank`` of ``world`` draws the samples that sub-envs
    ``rank * n ...`` of one ``world * n`` batched env would draw, and samples tokens from its own
    random stream; with one process both are as they always were.
    """
    n, T = envs.num_envs, config.max_new_tokens
    seed = config.seed * 1_000_003 + (iteration * world + rank) * n
    if config.estimator == "gae":
        obs, _ = envs.reset(seed=seed)
    else:
        obs, _ = reset_groups(envs, config.group_size, seed)
    lm = envs.unwrapped.lm
    # the ids each sub-env prefilled (chat template and truncation included), not re-encoded
    prompts = [list(env.sequence.ids) for env in envs.unwrapped.envs]
    gen = torch.Generator(device="cpu").manual_seed(
        config.seed * 7919 + iteration + rank * 1_000_000_007
    )
    tokens = torch.full((n, T), lm.eos_token_id, dtype=torch.long)
    mask, logprobs, values, rewards = (torch.zeros(n, T) for _ in range(4))
    active = np.ones(n, dtype=bool)
    metrics, texts = [0.0] * n, [""] * n
    device = next(value_head.parameters()).device
    masks = None
    if masker is not None:
        masker.start(prompts)
        masks = torch.zeros(n, T, lm.vocab_size, dtype=torch.bool)
    for t in range(T):
        logits = envs.unwrapped.logits.float() / config.temperature  # (N, V): the env's own forward
        if masker is not None:
            allowed = masker.mask().to(logits.device)  # (N, V)
            # the rows still running only: an ended row's positions keep no mask, so the update
            # leaves them unmasked (its padding token may lie outside a stale nucleus: -inf)
            running = torch.as_tensor(active)
            masks[running, t] = allowed.cpu()[running]
            logits = logits.masked_fill(~allowed, float("-inf"))
        logits[torch.as_tensor(~active, device=logits.device)] = 0.0  # ended rows: step dropped
        logp_all = torch.log_softmax(logits, dim=-1).cpu()
        action = torch.multinomial(logp_all.exp(), 1, generator=gen)[:, 0]  # (N,)
        value = value_head(torch.as_tensor(obs, device=device)).squeeze(-1).cpu()
        if masker is not None:  # the masking policy reads the same tokens
            masker.advance(action.tolist(), np.flatnonzero(active).tolist())
        obs, reward, terminated, truncated, infos = envs.unwrapped.step_unfinished(action.numpy())
        for i in np.flatnonzero(active):
            tokens[i, t], mask[i, t] = action[i], 1.0
            logprobs[i, t], values[i, t], rewards[i, t] = (
                logp_all[i, action[i]],
                value[i],
                float(reward[i]),
            )
            if terminated[i] or truncated[i]:
                active[i] = False
                metrics[i] = float(infos["metric"][i])
                texts[i] = str(infos["text"][i])
        if not active.any():
            break
    return Rollout(prompts, tokens, mask, logprobs, values, rewards, metrics, texts, masks)


# ---------------------------------------------------------------------------------------------
# Full-sequence passes: reference log-probs, and the policy's log-probs / values / entropy
# ---------------------------------------------------------------------------------------------


def batch_sequences(prompts: list[list[int]], tokens: torch.Tensor, mask: torch.Tensor, pad: int):
    """Right-padded ``prompt + generated`` ids, attention mask and the index of each token's logits.

    Returns ids ``(B, L)``, attention ``(B, L)`` and ``positions`` ``(B, T)``: the sequence index
    whose output predicts generated token ``t`` (``len(prompt) + t - 1``).
    """
    B, T = tokens.shape
    lengths = [len(p) + int(m.sum()) for p, m in zip(prompts, mask)]
    L = max(lengths)
    ids = torch.full((B, L), pad, dtype=torch.long)
    attention = torch.zeros(B, L, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        n = int(mask[b].sum())
        ids[b, : len(p)] = torch.tensor(p)
        ids[b, len(p) : len(p) + n] = tokens[b, :n]
        attention[b, : len(p) + n] = 1
        positions[b] = len(p) - 1 + torch.arange(T).clamp(max=max(n - 1, 0))
    return ids, attention, positions


def sequence_outputs(
    model,
    ids,
    attention,
    positions,
    tokens,
    temperature: float,
    with_hidden: bool,
    action_mask: torch.Tensor | None = None,
):
    """Log-probs of ``tokens`` ``(B, T)``, entropy ``(B, T)``, final hidden states ``(B, T, d)``.

    ``action_mask`` ``(B, T, V)`` (NLPO): the distribution at each position is renormalised over
    the tokens the rollout could sample there.
    """
    # The LM head runs at the scored positions only (transformers' logits_to_keep, where the
    # model takes it): a long prompt's other positions would cost a (B, L, V) tensor of logits.
    keep = None
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        keep = torch.unique(positions)  # sorted: the positions any row scores
    # no KV cache: nothing reads it, and a checkpointed block's second forward would extend it
    out = model(
        input_ids=ids,
        attention_mask=attention,
        output_hidden_states=with_hidden,
        use_cache=False,
        **({} if keep is None else {"logits_to_keep": keep}),
    )
    at = positions if keep is None else torch.searchsorted(keep, positions.contiguous())
    logits = torch.gather(out.logits, 1, at[..., None].expand(-1, -1, out.logits.shape[-1]))
    logits = logits.float() / temperature
    index = positions[..., None]
    if action_mask is not None:
        # positions after an episode's end hold no mask (all False): left unmasked, not NaN
        action_mask = action_mask | ~action_mask.any(-1, keepdim=True)
        logits = logits.masked_fill(~action_mask, float("-inf"))
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = torch.gather(logp_all, 2, tokens[..., None]).squeeze(-1)
    if action_mask is None:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    else:  # masked tokens: p = 0 and log p = -inf; zeroed before the product (no NaN gradient)
        entropy = -(logp_all.exp() * logp_all.masked_fill(~action_mask, 0.0)).sum(-1)
    hidden = None
    if with_hidden:
        h = out.hidden_states[-1]
        hidden = torch.gather(h, 1, index.expand(-1, -1, h.shape[-1])).float()
    return logp, entropy, hidden


@torch.no_grad()
def greedy_metrics(
    lm: LanguageModel | str,
    env_id: str,
    split: str = "test",
    max_samples: int = 200,
    max_new_tokens: int = 16,
    reward: str | None = None,
    env_kwargs: dict | None = None,
) -> list[float]:
    """The task metric of greedy decoding (top-1 actions) on each of the first ``max_samples`` of
    a split, in sample order (what paired comparisons need); ``env_kwargs``: more arguments of
    the env.
    """
    env = gym.make(
        env_id,
        **(env_kwargs or {}),
        model=lm,
        split=split,
        token_mode="topk",
        k=1,
        max_steps=max_new_tokens,
        **({"reward": reward} if reward else {}),
    )
    return evaluate_policy(env, lambda obs, mask: 0, max_samples=max_samples)["metrics"]


def greedy_metric(*args, **kwargs) -> float:
    """Mean of :func:`greedy_metrics` (same arguments)."""
    return float(np.mean(greedy_metrics(*args, **kwargs)))


# ---------------------------------------------------------------------------------------------
# Past one process: accelerate (data parallel, mixed precision) and peft (LoRA), both optional
# ---------------------------------------------------------------------------------------------


def require(module: str, extra: str, feature: str):
    """Import an optional engine, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{feature} needs the {module!r} package: pip install 'textenvs[{extra}]'."
        ) from e


def make_accelerator(config: TokenPPOConfig):
    """An ``accelerate.Accelerator`` when this process is one of several (started by ``accelerate
    launch`` or ``torchrun``) or mixed precision is asked for; None otherwise (plain PyTorch).
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if not launched and config.mixed_precision == "no" and launcher_precision == "no":
        return None
    accelerate = require("accelerate", "accelerate", "Data-parallel or mixed-precision token PPO")
    return accelerate.Accelerator(
        cpu=torch.device(config.device).type == "cpu",
        mixed_precision=None if config.mixed_precision == "no" else config.mixed_precision,
    )


def make_rollout_envs(config: TokenPPOConfig, lm: LanguageModel):
    """The batched env that runs ``lm`` (the policy) for rollouts: ``config.num_envs`` sub-envs of
    ``config.env_id`` in vocabulary mode; refuses an env whose actions are not the vocabulary.
    """
    env_kwargs = {
        **config.env_kwargs,
        "model": lm,
        "token_mode": "vocab",
        "max_steps": config.max_new_tokens,
        "device": str(lm.device),
        "dense": config.dense,
        "text_infos": True,  # the completions' texts, for logs and samples
    }
    if config.reward is not None:
        env_kwargs["reward"] = config.reward
    try:
        envs = gym.make_vec(
            config.env_id,
            num_envs=config.num_envs,
            autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP,
            **env_kwargs,
        )
    except TypeError as e:  # an env that takes no token_mode / max_steps: not a textenvs env
        raise ValueError(
            "Token PPO needs a generation env whose actions are the vocabulary; "
            f"{config.env_id} is not one ({e}). Use textenvs/Summarize-v0, Translate-v0 or "
            "Generate-v0."
        ) from e
    space = envs.single_action_space
    if not (isinstance(space, gym.spaces.Discrete) and space.n == lm.vocab_size):
        raise ValueError(
            "Token PPO needs an env whose action space is the vocabulary "
            f"(Discrete({lm.vocab_size})), got {space} from {config.env_id}: use a "
            "generation env (textenvs/Summarize-v0, Translate-v0, Generate-v0)."
        )
    if not hasattr(type(envs.unwrapped), "logits"):
        raise ValueError(
            f"{config.env_id} does not expose next-token logits: use a textenvs generation env."
        )
    return envs


def add_lora(model: torch.nn.Module, config: TokenPPOConfig):
    """Inject ``config``'s LoRA adapter into ``model`` in place; returns the ``peft.PeftModel``
    (whose ``disable_adapter()`` gives the base model back).
    """
    peft = require("peft", "lora", "LoRA (lora_r > 0)")
    targets = (
        [m.strip() for m in config.lora_target_modules.split(",") if m.strip()]
        if config.lora_target_modules
        else None
    )
    lora = peft.LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=targets,
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D layout
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, lora)
    except ValueError as e:
        raise ValueError(
            f"LoRA cannot adapt {config.model!r} with lora_target_modules="
            f"{config.lora_target_modules!r} ({e}). Name modules this model has, e.g. c_attn for "
            "GPT-2 or q_proj,v_proj for Llama-style models."
        ) from e


class PolicyWithValue(torch.nn.Module):
    """The policy LM and its value head as one module: what a data-parallel engine wraps, so that
    one forward gives every quantity the loss differentiates.
    """

    def __init__(self, model: torch.nn.Module, value_head: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.value_head = model, value_head

    def forward(self, ids, attention, positions, tokens, temperature: float, action_mask=None):
        """Log-probs, entropies and values of ``tokens``, each ``(B, T)``."""
        logp, entropy, hidden = sequence_outputs(
            self.model, ids, attention, positions, tokens, temperature, True, action_mask
        )
        return logp, entropy, self.value_head(hidden).squeeze(-1).float()


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Activation checkpointing of every transformer block of ``model`` (the classes it names in
    ``_no_split_modules``): a forward that builds a graph saves only each block's inputs, and the
    backward runs the block's forward again to get the rest (``torch.utils.checkpoint``,
    non-reentrant). Forwards without gradients run as they are. Only the block's ``forward`` is
    checkpointed, its module hooks (FSDP2's gather and free) stay outside, as in transformers'
    own ``gradient_checkpointing_enable``, which, unlike this, acts in training mode only (the
    trainer keeps the model in eval mode: no dropout). Returns how many blocks.
    """
    from agents.fsdp import transformer_blocks

    blocks = transformer_blocks(model)
    for block in blocks:
        block.forward = types.MethodType(_checkpointed_forward, block)  # deepcopy-safe binding
    return len(blocks)


def held_for_backward(forward):
    """``forward()``'s result and the bytes of the tensors its autograd graph keeps for the
    backward (activation memory, counted as autograd saves each tensor; a tensor saved twice
    counts twice)."""
    kept = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        kept.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        result = forward()
    return result, sum(kept)


def _checkpointed_forward(block: torch.nn.Module, *args, **kwargs):
    forward = type(block).forward
    if not torch.is_grad_enabled():
        return forward(block, *args, **kwargs)
    return torch.utils.checkpoint.checkpoint(
        functools.partial(forward, block, **kwargs), *args, use_reentrant=False
    )


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class TokenPPO:
    """Token-level PPO on a textenvs generation env; the policy is ``self.lm`` itself.

    ``accelerator`` (an ``accelerate.Accelerator``, see :func:`make_accelerator`) runs it data
    parallel: each process collects ``num_envs`` episodes through its own batched env, every loss
    and statistic is a mean over all processes' tokens, the engine all-reduces the gradients, and
    process 0 alone writes checkpoints, logs and the progress bar. ``total_episodes`` counts the
    episodes of all processes. None: one process, plain PyTorch.

    With ``lora_r > 0`` the LM gets a peft LoRA adapter in place: the env's forwards run the
    adapted model, the value head reads the adapted trunk, the reference is the same weights with
    the adapter switched off, and only the adapter and the value head train.
    """

    def __init__(self, config: TokenPPOConfig, accelerator=None) -> None:
        config.validate()
        if config.checkpoint_dir:  # a user's folder is refused now, not after training
            check_save_target(config.checkpoint_dir)
        self.config = config
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        device = config.device
        if accelerator is not None:
            device = accelerator.device
            if torch.device(config.device).type != device.type:
                raise ValueError(
                    f"config.device is {config.device!r} but the accelerator runs on {device}: "
                    "pass the device type the launcher uses (--device cuda on GPUs)."
                )
            self._refuse_parameter_sharding()
        if config.fsdp and not (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        ):
            raise ValueError(
                "fsdp=True shards over the processes of a distributed launch, and this process "
                "is not one: run `accelerate launch --config_file agents/accelerate/ddp.yaml "
                "--num_processes N -m agents.token_ppo --fsdp true ...` (or torchrun)."
            )
        torch.manual_seed(config.seed)
        self.lm = LanguageModel(config.model, device=device, dtype=config.dtype)  # trained
        self.model = self.lm.model
        self.peft = None
        if config.lora_r:
            self.peft = add_lora(self.model, config)
            self.reference = None  # the base weights with the adapter switched off
        else:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.model.requires_grad_(True)
        self.model.eval()  # no dropout: rollout and update must score tokens alike
        self.value_head = torch.nn.Linear(self.lm.hidden_size, 1).to(self.lm.device)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.envs = make_rollout_envs(config, self.lm)
        self.masker = (
            NLPOMasker(self.lm, config.num_envs, config.nlpo_top_p) if config.nlpo_top_p else None
        )
        if config.gradient_checkpointing:  # the policy only: nothing else builds a graph
            checkpoint_blocks(self.model)
        self.policy = PolicyWithValue(self.model, self.value_head)
        self.units: list[torch.nn.Module] = []  # FSDP units of the policy (fsdp=True)
        if config.fsdp:  # every block, the LM (embeddings, head) over them, the value head
            from agents.fsdp import shard

            self.units = shard(self.model, self.value_head)
            if self.reference is not None:
                shard(self.reference)
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.trainable, lr=config.learning_rate, eps=1e-5)
        if accelerator is not None and not config.fsdp:  # DDP around the policy
            self.policy, self.optimizer = accelerator.prepare(self.policy, self.optimizer)
        self.kl = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.iteration = 0
        self.history: list[dict] = []
        self.writer = None
        if config.tensorboard_log and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(config.tensorboard_log)

    def _refuse_parameter_sharding(self) -> None:
        """Data parallel here means DDP: every process holds the whole model.

        Rollouts run the policy token by token on each process's own env, a different number of
        forwards per process; engines that shard the parameters (FSDP, DeepSpeed ZeRO-3) gather
        them in a collective at every forward, which would wait for ever, and engines that shard
        the optimizer state (DeepSpeed ZeRO-1/2) would need sharded checkpoints, which this
        trainer's checkpoints are not. Both are refused before anything is built.
        """
        from accelerate.utils import DistributedType

        kind = self.accelerator.state.distributed_type
        if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ValueError(
                f"Token PPO does not run under accelerate's {kind.value} engine: each process "
                "generates its own episodes, a different number of forwards per process, which "
                "that engine's sharded forwards cannot serve. It shards itself: launch with "
                "agents/accelerate/ddp.yaml and pass --fsdp true (FSDP2 per transformer block, "
                "the parameters gathered once per rollout, sharded checkpoints); or --lora-r "
                "(with --mixed-precision bf16) to fit a large model on each GPU."
            )

    # -- the processes of a data-parallel run ----------------------------------------------
    @property
    def is_main(self) -> bool:
        """Process 0 (the only one in a plain run): it writes checkpoints, logs and reports."""
        return self.rank == 0

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the processes (``x`` itself with one process); no gradient."""
        return x if self.accelerator is None else self.accelerator.reduce(x, reduction="sum")

    def _mean_over_processes(self, x: torch.Tensor) -> float:
        return float(self._sum(x.to(self.lm.device)) / self.world)

    def _wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def _autocast(self):
        return self.accelerator.autocast() if self.accelerator is not None else nullcontext()

    def _gathered(self):
        """fsdp=True: the policy's parameters whole for a rollout or an evaluation (collective:
        every process enters); otherwise nothing to do."""
        if not self.units:
            return nullcontext()
        from agents.fsdp import gathered

        return gathered(self.units)

    @property
    def episodes_per_iteration(self) -> int:
        return self.config.num_envs * self.world

    @property
    def iterations(self) -> int:
        return math.ceil(self.config.total_episodes / self.episodes_per_iteration)

    def collect(self) -> Rollout:
        """This iteration's episodes (this process's share), through this process's batched env.
        A subclass may collect them elsewhere (``agents.ray_rollouts``: on Ray actors).
        """
        with self._gathered(), self._autocast():
            return collect_rollout(
                self.envs,
                self.value_head,
                self.config,
                self.iteration,
                self.rank,
                self.world,
                self.masker,
            )

    def _reference_logprobs(self, ids, attention, positions, tokens) -> torch.Tensor:
        if self.peft is None:
            model = self.reference
            adapter_off = nullcontext()
        else:  # the same weights, adapter switched off: no second copy of the model
            model = self.model
            adapter_off = self.peft.disable_adapter()
        with adapter_off:
            logp = sequence_outputs(
                model, ids, attention, positions, tokens, self.config.temperature, False
            )[0]
        if self.units and self.reference is not None:
            # FSDP keeps a root's parameters whole after its forward (for the backward that
            # follows); the reference has no backward: free its embeddings and head now
            self.reference.reshard()
        return logp

    def update(self, rollout: Rollout) -> dict:
        """KL-penalised rewards, GAE, then PPO epochs over shuffled minibatches of episodes.

        Every mean (whitening, losses, logged figures) is over the tokens of all processes.
        """
        c, device = self.config, self.lm.device
        pad = self.lm.eos_token_id
        ids, attention, positions = batch_sequences(
            rollout.prompts, rollout.tokens, rollout.mask, pad
        )
        ids, attention, positions = ids.to(device), attention.to(device), positions.to(device)
        tokens, mask = rollout.tokens.to(device), rollout.mask.to(device)
        allowed = None if rollout.action_masks is None else rollout.action_masks.to(device)
        old_logp, old_values = rollout.logprobs.to(device), rollout.values.to(device)
        started = time.time()
        with torch.no_grad():
            with self._autocast():
                ref_logp = self._reference_logprobs(ids, attention, positions, tokens)
            reference_s = time.time() - started
            kl_of = kl_k1 if c.kl_estimator == "k1" else kl_k3
            kl = kl_of(old_logp, ref_logp) * mask  # (B, T)
            rewards = rollout.env_rewards.to(device)
            if c.kl_placement == "reward":
                rewards = rewards - self.kl.value * kl
            if c.estimator == "gae":
                advantages, returns = gae(rewards, old_values, mask, c.gamma, c.gae_lambda)
                if c.whiten_advantages:
                    advantages = masked_whiten(advantages, mask, reduce=self._sum) * mask
            else:  # one advantage per episode, every token of it (dense rewards sum to its score)
                per_episode = group_advantages(rewards.sum(1), c.group_size, c.estimator)
                advantages, returns = per_episode[:, None] * mask, torch.zeros_like(rewards)
        if c.anneal_lr:
            for g in self.optimizer.param_groups:
                g["lr"] = c.learning_rate * (1 - self.iteration / self.iterations)
        rng = np.random.default_rng(c.seed * 1_000_003 + self.iteration)
        names = ("loss", "policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl")
        stats = {k: [] for k in names[1:]}
        B = tokens.shape[0]
        for epoch in range(c.num_epochs):
            order = rng.permutation(B)
            for start in range(0, B, c.minibatch_size):
                mb = torch.as_tensor(order[start : start + c.minibatch_size], device=device)
                m = mask[mb]
                logp, entropy, values = self.policy(
                    ids[mb],
                    attention[mb],
                    positions[mb],
                    tokens[mb],
                    c.temperature,
                    None if allowed is None else allowed[mb],
                )
                mean = functools.partial(masked_share, total=self._sum(m.sum()), world=self.world)
                if c.ratio_level == "sequence":  # one ratio and advantage per completion
                    per_completion = functools.partial(
                        masked_share,
                        total=self._sum(m.new_tensor(float(len(mb)))),
                        world=self.world,
                    )
                    pg_loss, clipfrac = sequence_policy_loss(
                        logp, old_logp[mb], per_episode[mb], m, c.clip_range, per_completion
                    )
                else:
                    pg_loss, clipfrac = clipped_policy_loss(
                        logp, old_logp[mb], advantages[mb], m, c.clip_range, mean
                    )
                if c.estimator == "gae":
                    v_loss = clipped_value_loss(
                        values, old_values[mb], returns[mb], m, c.clip_range_value, mean
                    )
                else:  # no value head to train: the group is the baseline
                    v_loss = torch.zeros((), device=device)
                ent = mean(entropy, m)
                loss = pg_loss + c.vf_coef * v_loss - c.ent_coef * ent
                if c.kl_placement == "loss":  # the current policy's KL, differentiated
                    loss = loss + self.kl.value * mean(kl_of(logp, ref_logp[mb]), m)
                with torch.no_grad():  # one all-reduce: global figures, and one verdict on NaN
                    approx_kl = mean(old_logp[mb] - logp, m)
                    parts = torch.stack([loss, pg_loss, v_loss, ent, clipfrac, approx_kl])
                    figures = (self._sum(parts.float()) / self.world).tolist()
                if not all(math.isfinite(f) for f in figures):
                    raise FloatingPointError(
                        f"Non-finite loss or statistic ({dict(zip(names, figures))}) at "
                        f"iteration {self.iteration}, epoch "
                        f"{epoch}, minibatch {start // c.minibatch_size}: training stopped. The "
                        f"last good checkpoint ({c.checkpoint_dir or 'none configured'}) is "
                        "intact; lower learning_rate or check the reward."
                    )
                self.optimizer.zero_grad()
                if self.accelerator is not None and not c.fsdp:
                    self.accelerator.backward(loss)
                    self.accelerator.clip_grad_norm_(self.trainable, c.max_grad_norm)
                else:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self.trainable, c.max_grad_norm)
                self.optimizer.step()
                for name, value in zip(names[1:], figures[1:]):
                    stats[name].append(value)
        episode_kl = self._mean_over_processes(kl.sum(1).mean())
        if c.adaptive_kl:
            self.kl.update(episode_kl, B * self.world)
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out.update(
            kl=episode_kl,
            kl_coef=self.kl.value,
            explained_variance=(
                explained_variance(old_values, returns, mask, self._sum)
                if c.estimator == "gae"
                else float("nan")
            ),
            reward=self._mean_over_processes(rollout.env_rewards.sum(1).mean()),
            metric=self._mean_over_processes(
                torch.tensor(np.mean(rollout.metrics), dtype=torch.float64)
            ),
            lr=self.optimizer.param_groups[0]["lr"],
            reference_s=reference_s,  # the reference model's pass over the rollout
            update_s=time.time() - started - reference_s,  # advantages and the optimizer steps
        )
        return out

    def train(self, progress: bool = True, stop_after: int | None = None) -> list[dict]:
        """Run the remaining iterations (all of them, or those left after :meth:`load_checkpoint`).

        ``stop_after`` ends the call after that many iterations (the run can be resumed later).
        """
        c = self.config
        per_iteration = self.episodes_per_iteration
        last = (
            self.iterations
            if stop_after is None
            else min(self.iterations, self.iteration + stop_after)
        )
        bar = tqdm(
            total=self.iterations * per_iteration,
            initial=self.iteration * per_iteration,
            disable=not progress or not self.is_main,
            desc="token-ppo episodes",
        )
        while self.iteration < last:
            if self.masker is not None and self.iteration and self.iteration % c.nlpo_mu == 0:
                self.masker.refresh(self.model)  # NLPO: the masking policy catches up
            start = time.time()
            rollout = self.collect()
            rollout_s = time.time() - start
            stats = self.update(rollout)
            stats.update(
                rollout_s=rollout_s,  # the env's forwards and the sampling
                iteration=self.iteration,
                episodes=(self.iteration + 1) * per_iteration,
                tokens=int(self._sum(rollout.mask.sum().to(self.lm.device))),
                completions_per_s=per_iteration / rollout_s,
                iteration_s=time.time() - start,
            )
            self.history.append(stats)
            if self.writer is not None:
                for key, value in stats.items():
                    self.writer.add_scalar(f"token_ppo/{key}", value, stats["episodes"])
            self.iteration += 1
            bar.update(per_iteration)
            bar.set_postfix(metric=f"{stats['metric']:.3f}", kl=f"{stats['kl']:.2f}")
            if c.checkpoint_dir and c.save_every and self.iteration % c.save_every == 0:
                self.save_checkpoint(c.checkpoint_dir)
        bar.close()
        if c.checkpoint_dir:
            self.save_checkpoint(c.checkpoint_dir)
        return self.history

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, split: str = "test", max_samples: int | None = None) -> float | None:
        """Mean task metric of greedy decoding over the split (the same env, task and reward).

        fsdp=True: collective (every process calls it, the parameters are gathered); process 0
        evaluates and the others return None.
        """
        with self._gathered():
            if self.units and not self.is_main:
                return None
            return greedy_metric(
                self.lm,
                self.config.env_id,
                split,
                max_samples or self.config.eval_samples,
                self.config.max_new_tokens,
                self.config.eval_reward or self.config.reward,
                self.config.env_kwargs,
            )

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, folder: str | os.PathLike) -> Path:
        """The policy (``save_pretrained``; with LoRA the adapter only), the value head
        (safetensors) and the trainer state; process 0 writes, the others wait for it.

        Crash-consistent (:func:`agents.checkpoint.save_atomically`): a process killed at any
        instant of the save leaves the previous or the new checkpoint complete and loadable.
        """
        from safetensors.torch import save_file, save_model

        if self.units:
            return self._save_sharded(folder)

        def write(tmp: Path) -> None:
            if self.peft is not None:  # adapter_model.safetensors + adapter_config.json
                self.peft.save_pretrained(tmp, safe_serialization=True)
            else:
                self.model.save_pretrained(tmp, safe_serialization=True)
                torch.save(self.reference.state_dict(), tmp / "reference.pt")
            self.lm.tokenizer.save_pretrained(tmp)
            save_file(
                {k: v.contiguous() for k, v in self.value_head.state_dict().items()},
                tmp / "value_head.safetensors",
            )
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            if self.masker is not None:  # NLPO's masking policy (tied weights written once)
                save_model(self.masker.lm.model, str(tmp / "nlpo_masker.safetensors"))
            (tmp / "trainer_state.json").write_text(json.dumps(self._trainer_state()))

        if self.is_main:
            with quiet_loading():  # no "Writing model shards" bar per checkpoint
                save_atomically(folder, write)
        self._wait()
        return Path(folder)

    def _trainer_state(self) -> dict:
        return {
            "iteration": self.iteration,
            "kl_coef": self.kl.value,
            "config": dataclasses.asdict(self.config),
            "model_signature": self._signature(),
            "history": self.history,
            "sharded_processes": self.world if self.units else None,
        }

    def _sharded_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"policy": self.policy}
        if self.reference is not None:
            modules["reference"] = self.reference
        return modules

    def _save_sharded(self, folder: str | os.PathLike) -> Path:
        """fsdp=True: every process writes its shards of the policy (value head included), the
        reference and the optimizer into ``shards/`` (``torch.distributed.checkpoint``); process
        0 adds the tokenizer and the trainer state; crash-consistent as every checkpoint."""
        from agents.checkpoint import save_atomically_together
        from agents.fsdp import save_shards, sharded_state

        state = sharded_state(self._sharded_modules(), self.optimizer, "policy")

        def write_rest(tmp: Path) -> None:
            self.lm.tokenizer.save_pretrained(tmp)
            (tmp / "trainer_state.json").write_text(json.dumps(self._trainer_state()))

        save_atomically_together(
            folder,
            lambda tmp: save_shards(tmp / "shards", state),
            write_rest,
            self.is_main,
            self._wait,
        )
        return Path(folder)

    def export(self, folder: str | os.PathLike) -> Path:
        """The trained policy as a plain ``save_pretrained`` folder (safetensors + tokenizer) that
        transformers and ``gym.make(id, model=folder)`` load; with LoRA, the adapter merged into a
        copy of the base weights (this trainer keeps its adapter and can go on training).
        """
        if self.units:  # the whole model gathered onto process 0's CPU (collective)
            model = self._gathered_model()
        elif self.is_main:
            model = self.model if self.peft is None else copy.deepcopy(self.peft).merge_and_unload()
        if self.is_main:

            def write(tmp: Path) -> None:
                model.save_pretrained(tmp, safe_serialization=True)
                self.lm.tokenizer.save_pretrained(tmp)

            with quiet_loading():
                save_atomically(folder, write)
        self._wait()
        return Path(folder)

    def _gathered_model(self) -> torch.nn.Module | None:
        """fsdp=True: a plain (unsharded) copy of the policy's LM on process 0's CPU, LoRA merged;
        None on the other processes. Collective."""
        from transformers import AutoModelForCausalLM

        from agents.fsdp import full_state_dict

        whole = full_state_dict(self.policy)
        if not self.is_main:
            return None
        with quiet_loading():
            model = AutoModelForCausalLM.from_config(self.model.config)
        adapted = add_lora(model, self.config) if self.peft is not None else None
        model.load_state_dict(
            {k[len("model.") :]: v for k, v in whole.items() if k.startswith("model.")}
        )
        return model if adapted is None else adapted.merge_and_unload()

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Resume from :meth:`save_checkpoint`: same results as an uninterrupted run for the same
        seed.

        All or nothing: every file is read and checked against this trainer first (fields,
        tensor names and shapes, the optimizer's parameter groups), and only then is anything
        replaced; a damaged checkpoint raises ``ValueError`` naming the file and leaves the
        trainer as it was.
        """
        from safetensors.torch import load_file, load_model

        from textenvs.weights import load_matching

        # An interrupted save leaves a complete checkpoint behind: process 0 puts it in place.
        if self.is_main:
            recover(folder)
        self._wait()
        if recover(folder) is None:
            raise FileNotFoundError(
                f"No checkpoint in {folder}: train with --checkpoint-dir first."
            )
        folder = Path(folder)
        if not (folder / "trainer_state.json").exists():
            raise FileNotFoundError(
                f"{folder} holds no token-PPO checkpoint (no trainer_state.json): pass a folder "
                "written by --checkpoint-dir (TokenPPO.save_checkpoint)."
            )
        state = self._read_trainer_state(folder / "trainer_state.json")
        written_by = state.get("sharded_processes")
        if bool(written_by) != bool(self.units) or (self.units and written_by != self.world):
            wrote = f"a sharded run on {written_by} processes" if written_by else "an unsharded run"
            runs = f"a sharded run on {self.world}" if self.units else "an unsharded run"
            raise ValueError(
                f"The checkpoint in {folder} was written by {wrote}; this is {runs}: resume with "
                "the same --fsdp and number of processes, or start from its --export (a plain "
                "model folder, --model)."
            )
        if self.units:
            self._load_sharded(folder, state)
            return

        def read(name: str, loader):
            try:
                return loader(folder / name)
            except Exception as e:  # any damage: a missing, truncated or foreign file
                raise ValueError(
                    f"{folder / name}: cannot be read as part of a checkpoint ({type(e).__name__}: "
                    f"{e}); the trainer was left unchanged. Resume from an intact checkpoint."
                ) from e

        device = self.lm.device
        # the .pt files are zips: no member may inflate past what this trainer writes
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        trainable_bytes = sum(p.numel() * p.element_size() for p in self.trainable)
        for name, limit in (
            ("reference.pt", weight_bytes + 2**20),
            ("optimizer.pt", 2 * trainable_bytes + 2**20),  # Adam's two moments
        ):
            if (folder / name).is_file():
                read(name, lambda p, limit=limit: check_zip_sizes(p, lambda _: limit, "checkpoint"))
        if self.peft is not None:
            from peft import get_peft_model_state_dict, set_peft_model_state_dict

            weights = {
                "adapter_model.safetensors": (
                    read("adapter_model.safetensors", lambda p: load_file(p, device=str(device))),
                    get_peft_model_state_dict(self.peft),
                )
            }
        else:
            weights = {
                "model.safetensors": (  # checked against this model, never its config.json
                    read(
                        "model.safetensors",
                        lambda p: load_matching(p, self.model.state_dict(), device),
                    ),
                    self.model.state_dict(),
                ),
                "reference.pt": (
                    read(
                        "reference.pt",
                        lambda p: torch.load(p, weights_only=True, map_location=device),
                    ),
                    self.reference.state_dict(),
                ),
            }
        weights["value_head.safetensors"] = (
            read("value_head.safetensors", lambda p: load_file(p, device=str(device))),
            self.value_head.state_dict(),
        )
        optimizer = read(
            "optimizer.pt", lambda p: torch.load(p, weights_only=True, map_location=device)
        )
        for name, (loaded, expected) in weights.items():
            _check_state_dict(folder / name, loaded, expected)
        check_adam_state(folder / "optimizer.pt", optimizer, self.optimizer)
        masker = None
        if self.masker is not None:  # into a scratch copy: checked before anything is replaced
            masker = copy.deepcopy(self.masker.lm.model)
            read("nlpo_masker.safetensors", lambda p: load_model(masker, str(p), strict=True))
        # Everything is readable and fits: now replace, in an order that cannot fail half-way.
        if self.peft is not None:
            set_peft_model_state_dict(self.peft, weights["adapter_model.safetensors"][0])
        else:
            self.model.load_state_dict(weights["model.safetensors"][0])
            self.reference.load_state_dict(weights["reference.pt"][0])
        self.value_head.load_state_dict(weights["value_head.safetensors"][0])
        self.optimizer.load_state_dict(optimizer)
        if masker is not None:
            self.masker.lm.model = masker
        self.iteration, self.kl.value, self.history = (
            state["iteration"],
            state["kl_coef"],
            state["history"],
        )

    def _load_sharded(self, folder: Path, state: dict) -> None:
        """fsdp=True: read every shard into copies first (a damaged checkpoint leaves the trainer
        as it was), then replace. Collective."""
        from agents.fsdp import apply_state, load_shards

        modules = self._sharded_modules()
        try:
            loaded = load_shards(folder / "shards", modules, self.optimizer, "policy")
        except Exception as e:  # missing shards, other keys or shapes, truncated files
            raise ValueError(
                f"{folder / 'shards'}: cannot be read as this run's sharded checkpoint "
                f"({type(e).__name__}: {e}); the trainer was left unchanged."
            ) from e
        apply_state(modules, self.optimizer, "policy", loaded)
        self.iteration, self.kl.value, self.history = (
            state["iteration"],
            state["kl_coef"],
            state["history"],
        )

    def _read_trainer_state(self, path: Path) -> dict:
        """``trainer_state.json``, every field checked; an error names the field and the file."""
        state = read_json_object(path, "trainer state")
        checks = {
            "iteration": lambda v: type(v) is int and 0 <= v <= self.iterations,
            "kl_coef": lambda v: type(v) in (int, float) and math.isfinite(v) and v >= 0,
            "history": lambda v: (
                isinstance(v, list)
                and len(v) == state.get("iteration")
                and all(_is_history_record(h, i) for i, h in enumerate(v))
            ),
            "config": lambda v: isinstance(v, dict),
            "model_signature": lambda v: isinstance(v, dict),
        }
        expected = {
            "iteration": f"an int in [0, {self.iterations}] (this run's iterations)",
            "kl_coef": "a finite number >= 0",
            "history": "one record per iteration done, each with its iteration, episodes, "
            "metric and kl (finite numbers), every value a number",
            "config": "an object",
            "model_signature": "an object",
        }
        for field, ok in checks.items():
            if field not in state:
                raise ValueError(f"{path}: field {field!r} is missing.")
            if not ok(state[field]):
                raise ValueError(
                    f"{path}: field {field!r} is {state[field]!r}; expected {expected[field]}."
                )
        processes = state.get("sharded_processes")
        if processes is not None and not (type(processes) is int and processes >= 1):
            raise ValueError(
                f"{path}: field 'sharded_processes' is {processes!r}; expected null or an int >= 1."
            )
        if state["model_signature"] != self._signature():
            raise ValueError(
                f"The checkpoint in {path.parent} is for another model "
                f"({state['model_signature']}), not {self._signature()}: resume with the same "
                "--model it was trained from."
            )
        defaults = TokenPPOConfig()
        for name in ESTIMATOR_FIELDS:  # a checkpoint of another algorithm is not this run's
            trained = state["config"].get(name, getattr(defaults, name))
            if trained != getattr(self.config, name):
                raise ValueError(
                    f"The checkpoint in {path.parent} was trained with {name}={trained!r}, this "
                    f"run has {name}={getattr(self.config, name)!r}: resume with the same "
                    f"--{name.replace('_', '-')}."
                )
        trained_r = state["config"].get("lora_r", 0)
        if trained_r != self.config.lora_r:
            raise ValueError(
                f"The checkpoint in {path.parent} was trained with lora_r={trained_r}, this "
                f"trainer has lora_r={self.config.lora_r}: resume with the same --lora-r."
            )
        return state

    def _signature(self) -> dict:
        cfg = self.model.config
        return {
            "model_type": cfg.model_type,
            "vocab_size": self.lm.vocab_size,
            "hidden_size": self.lm.hidden_size,
            "num_hidden_layers": self.lm.n_layers,
        }


ADAM_GROUP_CHECKS = {
    "lr": lambda v: check_float("lr", v, 0, low_open=True),
    "eps": lambda v: check_float("eps", v, 0, low_open=True),
    "weight_decay": lambda v: check_float("weight_decay", v, 0),
    "betas": lambda v: [check_float("betas", b, 0, 1, high_open=True) for b in _pair(v)],
    "initial_lr": lambda v: check_float("initial_lr", v, 0, low_open=True),
}


def _pair(value) -> tuple:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"betas must be a pair of numbers, got {value!r}.")
    return tuple(value)


def check_adam_state(path: Path, loaded, optimizer: torch.optim.Optimizer) -> None:
    """An Adam ``state_dict`` read from ``path`` fits ``optimizer`` exactly: the same groups,
    keys and parameters, every hyperparameter in range (lr, eps > 0, betas in [0, 1), ...), every
    moment of its parameter's shape, finite (the second moment >= 0), every step a finite count;
    else a ValueError naming the file and the field, before anything is replaced."""

    def fail(field: str, problem: str):
        raise ValueError(f"{path}: field {field} {problem}; the trainer was left unchanged.")

    expected = optimizer.state_dict()
    if not isinstance(loaded, dict) or set(loaded) != {"state", "param_groups"}:
        fail("(top level)", "is not an optimizer state (keys 'state' and 'param_groups')")
    groups, state = loaded["param_groups"], loaded["state"]
    if not isinstance(groups, list) or len(groups) != len(expected["param_groups"]):
        fail("'param_groups'", f"is not a list of {len(expected['param_groups'])} groups")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in expected["param_groups"] for i in group["params"]]
    shapes = {i: tuple(p.shape) for i, p in zip(ids, params)}
    for g, (group, want) in enumerate(zip(groups, expected["param_groups"])):
        if not isinstance(group, dict) or set(group) != set(want):
            fail(f"'param_groups'[{g}]", f"does not have the keys {sorted(want)}")
        if group["params"] != want["params"]:
            fail(f"'param_groups'[{g}]['params']", "names other parameters than this trainer's")
        for key, value in group.items():
            try:
                if key in ADAM_GROUP_CHECKS:
                    ADAM_GROUP_CHECKS[key](value)
                elif key != "params" and type(value) is not type(want[key]):
                    raise ValueError(f"expected a {type(want[key]).__name__}, got {value!r}")
            except ValueError as e:
                fail(f"'param_groups'[{g}][{key!r}]", f"is out of range ({e})")
    if not isinstance(state, dict) or not set(state) <= set(shapes):
        fail("'state'", "names parameters this trainer does not have")
    for index, entry in state.items():
        where = f"'state'[{index}]"
        if not isinstance(entry, dict) or not {"step", "exp_avg", "exp_avg_sq"} <= set(entry):
            fail(where, "is not an Adam state (step, exp_avg, exp_avg_sq)")
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                fail(f"{where}[{key!r}]", f"is not a float tensor ({type(value).__name__})")
            wanted = () if key == "step" else shapes[index]
            if tuple(value.shape) != wanted:
                fail(f"{where}[{key!r}]", f"has shape {tuple(value.shape)}, not {wanted}")
            if not torch.isfinite(value).all() or (key != "exp_avg" and (value < 0).any()):
                fail(f"{where}[{key!r}]", "holds a non-finite or negative value")


HISTORY_KEYS = ("iteration", "episodes", "metric", "kl")


def _is_history_record(record, i: int) -> bool:
    """Record ``i`` of a trainer's history: its iteration ``i``, the keys reports read (finite),
    numbers only (a figure with nothing to measure, GRPO's explained variance, is NaN)."""
    return (
        isinstance(record, dict)
        and all(k in record and type(record[k]) in (int, float) for k in HISTORY_KEYS)
        and all(math.isfinite(record[k]) for k in HISTORY_KEYS)
        and record["iteration"] == i
        and all(type(v) in (int, float) for v in record.values())
    )


def _check_state_dict(path: Path, loaded: dict, expected: dict) -> None:
    """A loaded state dict has exactly the expected tensor names and shapes, else ValueError."""
    missing, extra = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
    shapes = [
        k for k in set(expected) & set(loaded) if tuple(loaded[k].shape) != tuple(expected[k].shape)
    ]
    if missing or extra or shapes:
        raise ValueError(
            f"{path}: does not fit this trainer (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"other shapes {sorted(shapes)[:3]}); the trainer was left unchanged."
        )
    broken = sorted(
        k for k, v in loaded.items() if v.is_floating_point() and not torch.isfinite(v).all()
    )
    if broken:
        raise ValueError(
            f"{path}: weights {broken[:3]} hold NaN or infinite values; the trainer was left "
            "unchanged. Resume from an intact checkpoint."
        )


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (a string right after ``name: type =
    value``), read from its source: what the CLI's ``--help`` says of each option."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for field, after in zip(body, body[1:]):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[field.target.id] = " ".join(after.value.value.split())
    return docs


def main(argv: list[str] | None = None) -> dict | None:
    """The CLI; under ``accelerate launch`` / ``torchrun`` every process runs it, process 0
    evaluates, prints and writes the report.
    """
    p = argparse.ArgumentParser(description="Token-level PPO: the language model is the policy.")
    defaults, docs = TokenPPOConfig(), field_docs(TokenPPOConfig)
    for f in dataclasses.fields(TokenPPOConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        doc = docs.get(f.name, "").replace("%", "%%") + " (default: %(default)s)"
        if isinstance(value, bool):
            p.add_argument(flag, type=parse_bool, default=value, help=doc)
        elif isinstance(value, dict):
            p.add_argument(flag, type=json_object, default=value, help=doc)
        elif f.name in FIELD_CHECKS:  # argparse refuses a value out of range, naming the flag
            kind = type(value)
            check = FIELD_CHECKS[f.name]
            p.add_argument(flag, type=checked_arg(kind, check), default=value, help=doc)
        else:
            kind = type(value) if value is not None else str
            p.add_argument(flag, type=kind, default=value, help=doc)
    p.add_argument("--resume", help="a checkpoint folder to resume from")
    p.add_argument("--json-out", help="write the final report (JSON) here")
    p.add_argument(
        "--export",
        help="save the trained policy here as a plain save_pretrained folder (LoRA: merged)",
    )
    args = vars(p.parse_args(argv))
    resume, json_out, export = args.pop("resume"), args.pop("json_out"), args.pop("export")
    config = TokenPPOConfig(**args)
    if export:
        check_save_target(export)  # before any work, not after training
    trainer = TokenPPO(config, accelerator=make_accelerator(config))
    if resume:
        trainer.load_checkpoint(resume)
    evaluates = trainer.is_main or bool(trainer.units)  # sharded: every process gathers
    before = trainer.evaluate() if not resume and evaluates else None
    trainer._wait()
    start = time.time()
    history = trainer.train()
    train_seconds = round(time.time() - start, 1)
    if export:
        trainer.export(export)
    after = trainer.evaluate() if evaluates else None
    report = None
    if trainer.is_main:
        report = {
            "env_id": trainer.config.env_id,
            "test_metric_before": before,
            "test_metric_after": after,
            "episodes": trainer.iteration * trainer.episodes_per_iteration,
            "processes": trainer.world,
            "lora_r": trainer.config.lora_r,
            "fsdp": trainer.config.fsdp,
            "train_seconds": train_seconds,
            "final_kl": history[-1]["kl"] if history else None,
            "max_kl": max(h["kl"] for h in history) if history else None,
            "completions_per_s": float(np.mean([h["completions_per_s"] for h in history]))
            if history
            else None,
        }
        print(json.dumps(report))
        if json_out:
            saved = {**report, "config": dataclasses.asdict(trainer.config), "history": history}
            Path(json_out).write_text(json.dumps(saved, indent=1))
    trainer._wait()
    return report


if __name__ == "__main__":
    run_cli(main)  # a user error as one line, "error: ...", exit status 2
