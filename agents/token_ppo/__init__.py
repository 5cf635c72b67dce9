"""Token-level PPO whose policy is the language model itself (RL4LMs / TRL style, through textenvs).

The package, by role (SB3's split of an algorithm, TRL's config apart from its trainer):

- ``config.py``: :class:`TokenPPOConfig` in titled sections, every field documented and checked;
- ``losses.py``: the math, small pure functions each tested against a hand-computed case;
- ``estimators.py``: GAE / GRPO / RLOO, the ratio level and the KL's placement, chosen once;
- ``rollout.py``: episodes through the batched env (and NLPO's masking policy beside it);
- ``policy.py``: the ONE builder of the policy, value head, LoRA and reference; the
  full-sequence passes; block checkpointing;
- ``runtime.py``: one process, DDP or FSDP behind one interface;
- ``checkpoint.py``: whole and sharded checkpoints, export;
- ``trainer.py``: :class:`TokenPPO`, the loop; ``ray.py``: rollouts on Ray actors;
- ``cli.py`` / ``__main__.py``: the command line.

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

from agents.cli import field_docs
from agents.common import greedy_metric, greedy_metrics
from agents.token_ppo.cli import main
from agents.token_ppo.config import (
    ESTIMATOR_CHOICES,
    ESTIMATOR_FIELDS,
    FIELD_CHECKS,
    TIMING_STATS,
    TokenPPOConfig,
)
from agents.token_ppo.estimators import make_estimator, make_kl, make_policy_loss
from agents.token_ppo.losses import (
    AdaptiveKLController,
    clipped_objective,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    group_advantages,
    group_token_advantages,
    kl_k1,
    kl_k3,
    masked_mean,
    masked_share,
    masked_var,
    masked_whiten,
    sequence_policy_loss,
    top_p_mask,
)
from agents.token_ppo.policy import (
    PolicyWithValue,
    add_lora,
    batch_sequences,
    build_policy,
    checkpoint_blocks,
    held_for_backward,
    sequence_outputs,
)
from agents.token_ppo.rollout import (
    NLPOMasker,
    Rollout,
    RolloutSeeds,
    collect_rollout,
    concat_rollouts,
    make_rollout_envs,
    reset_groups,
    run_rollout,
)
from agents.token_ppo.runtime import make_accelerator, make_runtime, require
from agents.token_ppo.trainer import TokenPPO

__all__ = [
    "ESTIMATOR_CHOICES",
    "ESTIMATOR_FIELDS",
    "FIELD_CHECKS",
    "TIMING_STATS",
    "AdaptiveKLController",
    "NLPOMasker",
    "PolicyWithValue",
    "Rollout",
    "RolloutSeeds",
    "TokenPPO",
    "TokenPPOConfig",
    "add_lora",
    "batch_sequences",
    "build_policy",
    "checkpoint_blocks",
    "clipped_objective",
    "clipped_policy_loss",
    "clipped_value_loss",
    "collect_rollout",
    "concat_rollouts",
    "explained_variance",
    "field_docs",
    "gae",
    "greedy_metric",
    "greedy_metrics",
    "group_advantages",
    "group_token_advantages",
    "held_for_backward",
    "kl_k1",
    "kl_k3",
    "main",
    "make_accelerator",
    "make_estimator",
    "make_kl",
    "make_policy_loss",
    "make_rollout_envs",
    "make_runtime",
    "masked_mean",
    "masked_share",
    "masked_var",
    "masked_whiten",
    "require",
    "reset_groups",
    "run_rollout",
    "sequence_outputs",
    "sequence_policy_loss",
    "top_p_mask",
]
