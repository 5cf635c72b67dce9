"""An SB3 policy that starts where the language model is (needs the ``sb3`` extra).

``PPO(LMPriorPolicy, env)`` on a generation env made with ``candidates_obs=True``: action logits
are the LM's own log-probabilities of the actions (the last ``action_space.n`` observation entries)
plus a learned correction initialised at zero, with the value head on the observation. At
initialisation the policy samples exactly from the LM's distribution over the actions and its
deterministic action is the LM's greedy token, so PPO starts at the LM and moves away from it only
where the reward says so (the idea of KL-regularised fine-tuning, Jaques et al. 2017, as a policy
parameterisation: the prior is part of the logits, not a penalty).
"""

from __future__ import annotations

import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs


class LMPriorPolicy(ActorCriticPolicy):
    """Actor-critic with action logits = LM log-probabilities (from the observation) + correction.

    The observation must not be normalised (VecNormalize would rescale the log-probabilities);
    ``agents.sb3.build`` leaves it out for this policy.
    """

    def __init__(self, *args, max_correction: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if max_correction is not None and not max_correction > 0:
            raise ValueError(f"max_correction must be > 0 or None, got {max_correction!r}.")
        # None: an unbounded correction; a number c bounds it to c * tanh(.), c nats from the LM
        self.max_correction = max_correction
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

    # The three entry points that build an action distribution (predict goes through
    # get_distribution) keep the observation's prior for _get_action_dist_from_latent.
    def forward(self, obs: th.Tensor, deterministic: bool = False):
        self._prior = self._prior_of(obs)
        return super().forward(obs, deterministic)

    def evaluate_actions(self, obs: PyTorchObs, actions: th.Tensor):
        self._prior = self._prior_of(obs)
        return super().evaluate_actions(obs, actions)

    def get_distribution(self, obs: PyTorchObs):
        self._prior = self._prior_of(obs)
        return super().get_distribution(obs)

    def _prior_of(self, obs: th.Tensor) -> th.Tensor:
        return obs[..., -int(self.action_space.n) :].float()  # (B, n) log-probabilities

    def _get_action_dist_from_latent(self, latent_pi: th.Tensor):
        correction = self.action_net(latent_pi)  # (B, n)
        if self.max_correction is not None:
            correction = self.max_correction * th.tanh(correction / self.max_correction)
        logits = correction + self._prior
        return self.action_dist.proba_distribution(action_logits=logits)
