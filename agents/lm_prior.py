"""An SB3 policy that starts where the language model is (needs the ``sb3`` extra).

``PPO(LMPriorPolicy, env)`` on a generation env made with ``candidates_obs=True``: action logits
are the LM's own log-probabilities of the actions (the last ``action_space.n`` observation entries)
plus a learned correction initialised at zero, with the value head on the observation. At
initialisation the policy samples exactly from the LM's distribution over the actions and its
deterministic action is the LM's greedy token, so PPO starts at the LM and moves away from it only
where the reward says so (the idea of KL-regularised fine-tuning, Jaques et al. 2017, as a policy
parameterisation: the prior is part of the logits, not a penalty).

In top-k mode the correction has two parts: one logit per action from the observation (SB3's
``action_net``), and a score of each candidate from its own features (the observation's
per-candidate block: embedding projection and copy flags) and the policy's latent, by one small
network shared by all candidates (a pointer-network head: what it learns about "a token copied
from the prompt" holds for every action index).

Two options make PPO's update a KL-regularised fine-tuning of the LM, as token-level PPO does it:
``prior_temperature`` samples near the LM's greedy text (logits = correction + log p / T, so the
deterministic action is still the LM's greedy token at the start), and ``kl_to_prior=True`` turns
SB3's entropy bonus into a KL penalty: the "entropy" that ``evaluate_actions`` returns is
``-KL(policy || tempered LM)``, so PPO's ``ent_coef`` weighs how far the policy may move from the
LM in each state it trains on (an entropy bonus is the same term against the uniform policy, up to
a constant).
"""

from __future__ import annotations

import math

import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs

from textenvs.checks import check_bool
from textenvs.envs.generate import CANDIDATE_OBS_FEATURES


class LMPriorPolicy(ActorCriticPolicy):
    """Actor-critic with action logits = LM log-probabilities (from the observation) + correction.

    The observation must not be normalised (VecNormalize would rescale the log-probabilities);
    ``agents.sb3.build`` leaves it out for this policy.

    Args (besides ``ActorCriticPolicy``'s):
        max_correction: None (unbounded) or c > 0: the correction is ``c * tanh(. / c)``, at most
            c nats from the LM.
        candidate_features: numbers per candidate in the observation (the generation env's
            ``CANDIDATE_OBS_FEATURES``); the candidate head is built when the observation holds
            that block (top-k mode), and left out otherwise (vocabulary mode) or with 0.
        prior_temperature: T > 0: the prior is the LM's distribution at temperature T (its
            log-probabilities divided by T); below 1 the policy samples nearer the greedy text.
        kl_to_prior: the entropy term of ``evaluate_actions`` is ``-KL(policy || prior)``, so
            PPO's ``ent_coef`` is a KL coefficient (and must be > 0 to act); False: the entropy.
    """

    def __init__(
        self,
        *args,
        max_correction: float | None = None,
        candidate_features: int = CANDIDATE_OBS_FEATURES,
        prior_temperature: float = 1.0,
        kl_to_prior: bool = False,
        **kwargs,
    ) -> None:
        if max_correction is not None and not max_correction > 0:
            raise ValueError(f"max_correction must be > 0 or None, got {max_correction!r}.")
        if not (isinstance(prior_temperature, (int, float)) and 0 < prior_temperature < math.inf):
            raise ValueError(
                f"prior_temperature must be a finite number > 0, got {prior_temperature!r}."
            )
        kl_to_prior = check_bool("kl_to_prior", kl_to_prior)
        self.prior_temperature = float(prior_temperature)
        self.kl_to_prior = kl_to_prior
        if not (isinstance(candidate_features, int) and candidate_features >= 0):
            raise ValueError(
                f"candidate_features must be an integer >= 0, got {candidate_features!r}."
            )
        self.max_correction = max_correction
        self.candidate_features = candidate_features
        super().__init__(*args, **kwargs)
        n, size = int(self.action_space.n), int(self.observation_space.shape[-1])
        if size <= n:
            raise ValueError(
                f"LMPriorPolicy reads the last {n} observation entries as the actions' "
                f"log-probabilities, but the observation has only {size}: make the env with "
                "candidates_obs=True."
            )
        with th.no_grad():  # the correction starts at exactly zero: the policy IS the LM
            self.action_net.weight.zero_()
            self.action_net.bias.zero_()
        self._prior: th.Tensor | None = None
        self._candidates: th.Tensor | None = None

    def _build_mlp_extractor(self) -> None:
        # called by _build before the optimizer is made, so the head's parameters are trained
        super()._build_mlp_extractor()
        n, size, f = int(self.action_space.n), int(self.observation_space.shape[-1]), 0
        if self.candidate_features and size > n * (self.candidate_features + 1):
            f = self.candidate_features
        self._per_candidate = f
        self.candidate_net = None
        if f:
            latent = self.mlp_extractor.latent_dim_pi
            self.candidate_net = th.nn.Sequential(
                th.nn.Linear(latent + f, 64), th.nn.Tanh(), th.nn.Linear(64, 1)
            )
            with th.no_grad():  # zero at initialisation, like action_net
                self.candidate_net[-1].weight.zero_()
                self.candidate_net[-1].bias.zero_()

    # The three entry points that build an action distribution (predict goes through
    # get_distribution) keep the observation's prior and candidates for
    # _get_action_dist_from_latent.
    def forward(self, obs: th.Tensor, deterministic: bool = False):
        self._read(obs)
        return super().forward(obs, deterministic)

    def evaluate_actions(self, obs: PyTorchObs, actions: th.Tensor):
        self._read(obs)
        values, log_prob, entropy = super().evaluate_actions(obs, actions)
        if self.kl_to_prior:  # -KL(policy || prior) in place of the entropy (see the module doc)
            policy = self.action_dist.distribution  # the one super() just built from obs
            prior = self.prior_logprobs(obs)
            entropy = -(policy.probs * (policy.logits - prior)).sum(-1)
        return values, log_prob, entropy

    def get_distribution(self, obs: PyTorchObs):
        self._read(obs)
        return super().get_distribution(obs)

    def prior_logprobs(self, obs: th.Tensor) -> th.Tensor:
        """``(B, n)``: the actions' log-probabilities under the prior, the LM at
        ``prior_temperature`` (from the observation's last n entries); what ``kl_to_prior`` and
        :class:`KLPenalty` measure the policy against."""
        n = int(self.action_space.n)
        return th.log_softmax(obs.float()[..., -n:] / self.prior_temperature, dim=-1)

    def _read(self, obs: th.Tensor) -> None:
        n, f = int(self.action_space.n), self._per_candidate
        obs = obs.float()
        self._prior = obs[..., -n:] / self.prior_temperature  # (B, n) log-probabilities / T
        # (B, n, f): the per-candidate block before the log-probabilities, or None
        self._candidates = obs[..., -n * (f + 1) : -n].unflatten(-1, (n, f)) if f else None

    def _get_action_dist_from_latent(self, latent_pi: th.Tensor):
        correction = self.action_net(latent_pi)  # (B, n)
        if self.candidate_net is not None:
            n = int(self.action_space.n)
            shared = latent_pi.unsqueeze(-2).expand(*latent_pi.shape[:-1], n, latent_pi.shape[-1])
            scores = self.candidate_net(th.cat([shared, self._candidates], dim=-1))  # (B, n, 1)
            correction = correction + scores.squeeze(-1)
        if self.max_correction is not None:
            correction = self.max_correction * th.tanh(correction / self.max_correction)
        logits = correction + self._prior
        return self.action_dist.proba_distribution(action_logits=logits)


class KLPenalty(BaseCallback):
    """Token-level PPO's KL penalty inside SB3's PPO: each collected reward minus ``kl_coef *
    (log pi(a) - log prior(a))`` of the action taken, the prior being the LM's distribution at the
    policy's ``prior_temperature`` (:meth:`LMPriorPolicy.prior_logprobs`).

    ``model.learn(steps, callback=KLPenalty(0.05))`` with an :class:`LMPriorPolicy` (or a subclass
    such as :class:`agents.last_block.LastBlockPolicy`). The penalty is subtracted from the
    rollout's reward array in place, after the env step and before SB3 stores it, so the returns
    and advantages PPO trains on carry it (the env's own rewards and infos are untouched: episode
    statistics still report the task's reward).
    """

    def __init__(self, kl_coef: float) -> None:
        super().__init__()
        if not (isinstance(kl_coef, (int, float)) and 0 <= kl_coef < math.inf):
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}.")
        self.kl_coef = float(kl_coef)

    def _init_callback(self) -> None:
        if not isinstance(self.model.policy, LMPriorPolicy):
            raise ValueError(
                "KLPenalty reads the LM prior from an LMPriorPolicy (or LastBlockPolicy), but the "
                f"model's policy is {type(self.model.policy).__name__}: use one of those, or drop "
                "the callback."
            )

    def _on_step(self) -> bool:
        obs = self.locals["obs_tensor"]
        actions = th.as_tensor(self.locals["actions"], device=obs.device).long().view(-1)
        prior = self.model.policy.prior_logprobs(obs)
        prior = prior[th.arange(len(obs), device=obs.device), actions]
        taken = self.locals["log_probs"].float().to(obs.device)
        # in place: SB3 stores this very array in its rollout buffer after the callback
        self.locals["rewards"] -= (self.kl_coef * (taken - prior)).cpu().numpy()
        return True
