"""The math of the update: small pure functions, each tested against a hand-computed case
(``tests/test_token_ppo.py``), as SB3's ``test_gae.py`` and TRL's ``masked_whiten`` are.

``reduce`` arguments sum a tensor over the processes of a data-parallel run (the identity in one
process), so every mean is over all processes' tokens.
"""

from __future__ import annotations

import numpy as np
import torch


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


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)``: each token's undiscounted return from itself to the episode's end."""
    return (rewards * mask).flip(1).cumsum(1).flip(1) * mask


def group_token_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, group_size: int, kind: str
) -> torch.Tensor:
    """Per-token advantages from groups of ``group_size`` completions of one prompt, for dense
    rewards (our extension of GRPO / RLOO; ``group_credit="to_go"``).

    Token ``t`` of completion ``i`` gets its return-to-go ``G_it`` (:func:`returns_to_go`) minus
    its group's baseline at position ``t``: for ``kind="rloo"`` the mean of the group's *other*
    completions' ``G_jt`` (0 past a completion's end: it earns nothing more), which does not
    depend on completion ``i``'s actions, so the gradient stays unbiased; for ``kind="grpo"``
    the group's mean ``G_jt``, divided by the std of the group's returns (as
    :func:`group_advantages`; a per-position std would blow up late positions that few
    completions reach). At ``t = 0`` both equal :func:`group_advantages` of the returns.
    """
    togo = returns_to_go(rewards, mask)  # (B, T)
    batch, width = togo.shape
    if group_size < 2 or batch % group_size:
        raise ValueError(
            f"{batch} episodes do not make groups of {group_size} (group_size >= 2 must divide "
            "the episodes per rollout)."
        )
    groups = togo.view(-1, group_size, width)  # (B / G, G, T)
    if kind == "grpo":
        spread = groups[:, :, 0].std(1, keepdim=True)[..., None]  # (B / G, 1, 1)
        advantages = (groups - groups.mean(1, keepdim=True)) / (spread + 1e-4)
    elif kind == "rloo":
        others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
        advantages = groups - others
    else:
        raise ValueError(f"Unknown group estimator {kind!r}: choose 'grpo' or 'rloo'.")
    return advantages.reshape(batch, width) * mask


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
