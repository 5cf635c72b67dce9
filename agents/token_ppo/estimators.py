"""The advantage estimators, the policy-loss ratio levels and the KL's placement, each one object
chosen once from the config (:func:`make_estimator`, :func:`make_policy_loss`, :func:`make_kl`),
so the update runs the same lines whatever the algorithm.

==========  ==========================================  ===================================
estimator   advantage                                   baseline
==========  ==========================================  ===================================
``gae``     per token, GAE over the dense rewards        the value head (trained)
``grpo``    per completion, ``(R - mean_g) / std_g``     the group of ``group_size`` samples
``rloo``    per completion, ``R - mean(others_g)``       the group's other completions
==========  ==========================================  ===================================

``group_credit="to_go"`` (our extension, for dense rewards): a group estimator gives each token
its return-to-go against the group's mean return-to-go at that position
(:func:`~agents.token_ppo.losses.group_token_advantages`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from agents.token_ppo.config import TokenPPOConfig
from agents.token_ppo.losses import (
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    group_advantages,
    group_token_advantages,
    kl_k1,
    kl_k3,
    masked_share,
    masked_whiten,
    sequence_policy_loss,
)
from agents.token_ppo.rollout import reset_groups


@dataclass
class Advantages:
    """What an estimator gives the update, over one rollout of ``B`` episodes of ``T`` tokens."""

    advantages: torch.Tensor  # (B, T), zero off the episode's tokens
    returns: torch.Tensor  # (B, T) the value head's targets (zeros: no value head trained)
    per_episode: torch.Tensor | None = None  # (B,) one advantage per completion (groups)


class GAEEstimator:
    """Per-token advantages from the value head (Schulman et al. 2016), optionally whitened over
    every process's tokens; the value head trains on the returns."""

    def __init__(self, config: TokenPPOConfig) -> None:
        self.gamma, self.lam, self.whiten = (
            config.gamma,
            config.gae_lambda,
            config.whiten_advantages,
        )

    def reset(self, envs, seed: int):
        """Start a rollout: every sub-env its own sample."""
        return envs.reset(seed=seed)[0]

    def advantages(self, rewards, values, mask, reduce) -> Advantages:
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        if self.whiten:
            advantages = masked_whiten(advantages, mask, reduce=reduce) * mask
        return Advantages(advantages, returns)

    def value_loss(self, values, old_values, returns, mask, clip: float, mean) -> torch.Tensor:
        return clipped_value_loss(values, old_values, returns, mask, clip, mean)

    def explained_variance(self, old_values, returns, mask, reduce) -> float:
        return explained_variance(old_values, returns, mask, reduce)


class GroupEstimator:
    """One advantage per completion from its group of ``group_size`` completions of one prompt
    (GRPO: Shao et al. 2024; RLOO: Ahmadian et al. 2024), on every token of it (dense rewards sum
    to its score). The group is the baseline: no value head trains."""

    def __init__(self, config: TokenPPOConfig) -> None:
        self.kind, self.group_size = config.estimator, config.group_size
        self.to_go = config.group_credit == "to_go"

    def reset(self, envs, seed: int):
        """Start a rollout: each run of ``group_size`` sub-envs plays one sample."""
        return reset_groups(envs, self.group_size, seed)[0]

    def advantages(self, rewards, values, mask, reduce) -> Advantages:
        if self.to_go:  # each token its own return-to-go against the group's (dense rewards)
            advantages = group_token_advantages(rewards, mask, self.group_size, self.kind)
            return Advantages(advantages, torch.zeros_like(rewards))
        per_episode = group_advantages(rewards.sum(1), self.group_size, self.kind)
        return Advantages(per_episode[:, None] * mask, torch.zeros_like(rewards), per_episode)

    def value_loss(self, values, old_values, returns, mask, clip: float, mean) -> torch.Tensor:
        return torch.zeros((), device=values.device)

    def explained_variance(self, old_values, returns, mask, reduce) -> float:
        return float("nan")


def make_estimator(config: TokenPPOConfig) -> GAEEstimator | GroupEstimator:
    return GAEEstimator(config) if config.estimator == "gae" else GroupEstimator(config)


class TokenRatio:
    """PPO's clipped surrogate per token, averaged over every process's tokens."""

    def __call__(
        self, logp, old_logp, advantages: Advantages, mb, mask, clip: float, mean, runtime
    ):
        return clipped_policy_loss(logp, old_logp, advantages.advantages[mb], mask, clip, mean)


class SequenceRatio:
    """The clipped surrogate on whole completions (one ratio and one advantage each), averaged
    over every process's completions (TRL's ``RLOOTrainer``)."""

    def __call__(
        self, logp, old_logp, advantages: Advantages, mb, mask, clip: float, mean, runtime
    ):
        total = runtime.sum(mask.new_tensor(float(len(mb))))  # completions of every process
        per_completion = functools.partial(masked_share, total=total, world=runtime.world)
        return sequence_policy_loss(
            logp, old_logp, advantages.per_episode[mb], mask, clip, per_completion
        )


def make_policy_loss(config: TokenPPOConfig) -> TokenRatio | SequenceRatio:
    return SequenceRatio() if config.ratio_level == "sequence" else TokenRatio()


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


class KLInReward:
    """The KL to the reference subtracted from each token's reward (Ziegler et al. 2019)."""

    def __init__(self, config: TokenPPOConfig) -> None:
        self.estimate = KL_ESTIMATORS[config.kl_settings()[1]]

    def shape_rewards(self, rewards, kl, coef: float):
        return rewards - coef * kl

    def add_to_loss(self, loss, logp, ref_logp, mask, coef: float, mean):
        return loss


class KLInLoss(KLInReward):
    """The current policy's KL to the reference added to the loss, differentiated (TRL's GRPO)."""

    def shape_rewards(self, rewards, kl, coef: float):
        return rewards

    def add_to_loss(self, loss, logp, ref_logp, mask, coef: float, mean):
        return loss + coef * mean(self.estimate(logp, ref_logp), mask)


def make_kl(config: TokenPPOConfig) -> KLInReward:
    return KLInLoss(config) if config.kl_settings()[0] == "loss" else KLInReward(config)
