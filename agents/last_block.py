"""An SB3 policy whose actor is a trainable copy of the LM's last block (needs the ``sb3`` extra).

:class:`~agents.lm_prior.LMPriorPolicy` corrects a frozen LM from one hidden state; on Translate
that stays level with greedy. Token-level PPO beats greedy there, and most of its gain survives
when only the LM's last block is trained (README). :class:`LastBlockPolicy` puts that block inside
stock ``stable_baselines3.PPO``:

* The env is a top-k generation env made with ``obs="context"``, ``layer=-2`` and
  ``candidates_obs=True``: the observation holds the input of the last block at every position
  (from the env's own KV-cache forwards), the number of positions, the k candidates' token ids and
  their LM log-probabilities (see ``TextGenerationEnv``'s Observation Space).
* The actor runs the copied block for the current position only (its query attends over the keys
  and values of every position), then the LM's final norm and the LM head rows of the k candidates
  (both frozen), divided by ``prior_temperature``. At the start this IS the LM's tempered
  distribution over the candidates, and its deterministic action is the greedy token.
* The value head reads the current position's state and the candidates' log-probabilities.
* ``kl_to_prior`` works as in :class:`~agents.lm_prior.LMPriorPolicy`, and
  :class:`~agents.lm_prior.KLPenalty` puts token PPO's KL penalty into the rollout's rewards
  (``agents.sb3.SB3Config.kl_coef``): without it the block drifts below greedy within 50k steps.

The block's attention is written out for the GPT-2 layout (``transformer.h``, ``ln_f``, ``c_attn``
/ ``c_proj``, absolute position embeddings), which the built-in model and GPT-2 checkpoints have;
another layout gets a clear error.
"""

from __future__ import annotations

import copy
import os

import torch as th
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from agents.lm_prior import LMPriorPolicy
from textenvs.envs.generate import CANDIDATE_OBS_FEATURES
from textenvs.lm import TINY, LanguageModel, shared_model


def fitting_positions(env_id: str, splits=("train", "test"), round_to: int = 16, **env_kwargs):
    """The ``context_positions`` that holds every prompt of ``splits`` plus ``max_steps`` tokens,
    rounded up to a multiple of ``round_to`` and at most the model's context: one observation space
    for the train and test envs of ``env_id`` made with ``env_kwargs``, no larger than the data
    needs (the model's whole context can cost megabytes an observation)."""
    import gymnasium as gym

    import textenvs

    if textenvs.is_edit_env(env_id):
        raise ValueError(
            f"{env_id} is an edit env; obs='context' (what LastBlockPolicy reads) is a generation "
            "env's observation: use a generation id."
        )
    kwargs = {**env_kwargs, "obs": "context", "context_positions": None}
    longest = 0
    for split in splits:
        env = gym.make(env_id, split=split, **kwargs).unwrapped
        longest = max([longest, *env.prompt_lengths().tolist()])
        env.close()
    needed = longest + env.max_steps
    return min(env.lm.max_positions, -(-needed // round_to) * round_to)


def context_layout(space: spaces.Space, k: int, d: int) -> int:
    """The context positions P of a top-k ``obs="context"``, ``candidates_obs=True`` observation
    space of k candidates and hidden size d; a clear error for any other space."""
    tail = 1 + k + k * (CANDIDATE_OBS_FEATURES + 1)  # count, ids, candidate block, log-probs
    size = int(space.shape[-1]) if isinstance(space, spaces.Box) and space.shape else 0
    if len(space.shape or ()) != 1 or size <= tail or (size - tail) % d:
        raise ValueError(
            f"LastBlockPolicy reads a flat observation of P * {d} + {tail} entries (k={k}, hidden "
            f"size {d}), got {getattr(space, 'shape', space)}: make the env with "
            "token_mode='topk', obs='context', layer=-2 and candidates_obs=True, with the policy's "
            "model."
        )
    return (size - tail) // d


def split_context(obs: th.Tensor, positions: int, d: int, k: int):
    """``(context (B, P', d), lengths (B,), candidate ids (B, k), LM log-probabilities (B, k))``,
    the context cut to the longest sequence of the batch (P' <= P: the rest is padding)."""
    obs = obs.float()
    lengths = obs[:, positions * d].long()
    longest = int(lengths.max()) if len(lengths) else 1
    context = obs[:, : positions * d].view(-1, positions, d)[:, :longest]
    ids = obs[:, positions * d + 1 : positions * d + 1 + k].long()
    return context, lengths, ids, obs[:, -k:]


class CurrentPosition(BaseFeaturesExtractor):
    """The value head's input: the current position's state, the candidates' log-probabilities."""

    def __init__(self, observation_space: spaces.Box, d: int, k: int) -> None:
        super().__init__(observation_space, d + k)
        self.d, self.k = d, k
        self.positions = context_layout(observation_space, k, d)

    def forward(self, obs: th.Tensor) -> th.Tensor:
        context, lengths, _, logprobs = split_context(obs, self.positions, self.d, self.k)
        current = context[th.arange(len(obs), device=obs.device), lengths - 1]
        return th.cat([current, logprobs], dim=-1)


class LastBlockPolicy(LMPriorPolicy):
    """Actor = a trainable copy of the LM's last block over the env's context observation.

    It takes :class:`~agents.lm_prior.LMPriorPolicy`'s ``prior_temperature`` and
    ``kl_to_prior`` and ``ActorCriticPolicy``'s arguments, and:

    Args:
        model: the LM the env observes: a :class:`~textenvs.lm.LanguageModel` (it pickles as its
            name, so a saved PPO stays small) or a name / folder loaded as the envs do.
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Discrete,
        lr_schedule,
        *,
        model: str | os.PathLike | LanguageModel = TINY,
        **kwargs,
    ) -> None:
        lm = model if isinstance(model, LanguageModel) else shared_model(model)
        hf = lm.model
        if not (
            hasattr(hf, "transformer")
            and hasattr(hf.transformer, "h")
            and hasattr(hf.transformer, "ln_f")
            and hasattr(hf.transformer.h[-1].attn, "c_attn")
        ):
            raise ValueError(
                f"LastBlockPolicy runs the GPT-2 block layout (transformer.h[-1].attn.c_attn, "
                f"transformer.ln_f); model {lm.name!r} ({type(hf).__name__}) has another: use "
                "LMPriorPolicy or token-level PPO (agents.token_ppo) with this model."
            )
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"LastBlockPolicy needs a Discrete action space, got {action_space}.")
        self.lm = lm
        self.d, self.k = lm.hidden_size, int(action_space.n)
        self.positions = context_layout(observation_space, self.k, self.d)
        kwargs.setdefault("features_extractor_class", CurrentPosition)
        kwargs.setdefault("features_extractor_kwargs", {"d": self.d, "k": self.k})
        kwargs.setdefault("candidate_features", 0)  # no correction head: the block is the actor
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build_mlp_extractor(self) -> None:
        # called by _build before the optimizer is made, so the block's parameters are trained
        super()._build_mlp_extractor()
        hf = self.lm.model
        self.block = copy.deepcopy(hf.transformer.h[-1]).float().requires_grad_(True)
        self.ln_f = copy.deepcopy(hf.transformer.ln_f).float().requires_grad_(False)
        self.register_buffer("head", hf.get_output_embeddings().weight.detach().float().clone())
        config = hf.config
        self.heads = config.n_head
        scale = (self.d // self.heads) ** 0.5 if getattr(config, "scale_attn_weights", True) else 1
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale *= config.n_layer
        self.attention_scale = float(scale)
        self.lm = None  # the HF model is not part of the policy (nor of what SB3 saves)

    def train(self, mode: bool = True):
        super().train(mode)
        self.block.eval()  # no dropout: the rollout's policy and the update's are one
        return self

    def _read(self, obs: th.Tensor) -> None:
        super()._read(obs)  # the tempered prior, for kl_to_prior
        self._obs = obs

    def _get_action_dist_from_latent(self, latent_pi: th.Tensor):
        context, lengths, ids, _ = split_context(self._obs, self.positions, self.d, self.k)
        b, d, h = self.block, self.d, self.heads
        rows, hd, p = th.arange(len(context), device=context.device), d // h, context.shape[1]
        q, key, value = b.attn.c_attn(b.ln_1(context)).split(d, dim=-1)
        q = q[rows, lengths - 1].view(-1, h, hd)  # only the current position is needed
        scores = th.einsum("bhd,bphd->bhp", q, key.view(-1, p, h, hd)) / self.attention_scale
        valid = th.arange(p, device=context.device)[None, :] < lengths[:, None]
        attn = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(-1)
        mixed = th.einsum("bhp,bphd->bhd", attn, value.view(-1, p, h, hd))
        y = context[rows, lengths - 1] + b.attn.c_proj(mixed.reshape(-1, d))
        y = self.ln_f(y + b.mlp(b.ln_2(y)))
        logits = th.einsum("bd,bkd->bk", y, self.head[ids]) / self.prior_temperature
        return self.action_dist.proba_distribution(action_logits=logits)
