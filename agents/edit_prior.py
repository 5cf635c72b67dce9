"""MaskablePPO's policy for the edit envs that starts at the LM's draft (needs the ``sb3`` extra).

The edit-env counterpart of :class:`agents.lm_prior.LMPriorPolicy`: the LM's draft is the greedy
baseline of an edit env (stop at once), so the policy starts there, and scores every edit from what
the env's candidate block says of it (copy flags and LM log-probabilities of the token it writes
and of the token it changes). Use ``MaskablePPO(EditPriorPolicy, env, policy_kwargs={"max_len":
L, "k": k})`` on an env made with ``flat_actions=True, candidates_obs=True``, or ``python -m
agents.sb3 --env-id textenvs/EditSummary-v0 --policy lm_prior``.
"""

from __future__ import annotations

import torch as th
import torch.nn.functional as F
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy

from textenvs.envs.edit import DELETE, EditActionCodec, candidate_row_size


class EditPriorPolicy(MaskableActorCriticPolicy):
    """MaskablePPO's policy for edit envs made with ``flat_actions=True, candidates_obs=True``
    (needs sb3-contrib): it starts where the LM is, keeping the LM's draft.

    Every flat edit (:class:`textenvs.envs.edit.EditActionCodec`) is scored by one network shared
    by all edits, from the policy's latent and the edit's own numbers: its kind (insert, delete,
    replace), its relative position, the candidate block's numbers of the token it writes (copy
    flags, LM log-probability) and of the text token at its position. That head starts at zero and
    stop's logit at ``stop_logit`` > 0, so the deterministic action at initialisation is stop: the
    greedy baseline (the LM's draft), while sampling explores the edits (with about 150 valid
    edits, stop_logit 1 gives stop a probability of about 0.02; a larger one explores less: 4 gives
    0.27 and learned far slower on EditSummary-v0).

    Args (besides ``MaskableActorCriticPolicy``'s): ``max_len`` and ``k`` of the env (its
    ``max_len`` and ``k`` attributes; ``agents.sb3.build`` passes them), ``stop_logit``.
    """

    def __init__(self, *args, max_len: int, k: int, stop_logit: float = 1.0, **kwargs) -> None:
        if not stop_logit > 0:
            raise ValueError(
                f"stop_logit must be > 0 (stop is the starting action), got {stop_logit!r}."
            )
        self.codec = EditActionCodec(max_len, k)
        self.row_size = candidate_row_size(k)
        self.stop_logit = float(stop_logit)
        super().__init__(*args, **kwargs)
        n, shape = int(self.action_space.n), self.observation_space.shape
        rows = max_len + 1
        if n != self.codec.n or (shape[-1] if len(shape) == 2 else shape[0]) < rows * self.row_size:
            raise ValueError(
                f"EditPriorPolicy(max_len={max_len}, k={k}) expects Discrete({self.codec.n}) "
                f"actions and a candidate block of {rows} x {self.row_size} numbers, got "
                f"{self.action_space} and observations of shape {shape}: make the env with "
                "flat_actions=True, candidates_obs=True, token_mode='topk' and pass its max_len "
                "and k."
            )
        self._rows: th.Tensor | None = None
        self._edit_layout()

    def _build_mlp_extractor(self) -> None:
        super()._build_mlp_extractor()
        latent = self.mlp_extractor.latent_dim_pi
        # kind one-hot (3), relative position, the written token's 3 numbers, the text token's 4
        self.edit_net = th.nn.Sequential(
            th.nn.Linear(latent + 3 + 1 + 3 + (self.row_size - 3 * self.codec.n_tokens), 64),
            th.nn.Tanh(),
            th.nn.Linear(64, 1),
        )
        self.stop_net = th.nn.Linear(latent, 1)
        with th.no_grad():
            self.edit_net[-1].weight.zero_()
            self.edit_net[-1].bias.zero_()
            self.stop_net.weight.zero_()
            self.stop_net.bias.fill_(self.stop_logit)

    def _edit_layout(self) -> None:
        """For every flat edit after stop: its kind, position and token index (-1: none)."""
        kinds, positions, tokens = [], [], []
        for a in range(1, self.codec.n):
            op, p, t = self.codec.unflatten(a)
            kinds.append(op)
            positions.append(p)
            tokens.append(-1 if op == DELETE else t)  # delete writes no token
        self.register_buffer("_kinds", th.nn.functional.one_hot(th.tensor(kinds), 3).float())
        self.register_buffer("_positions", th.tensor(positions))
        self.register_buffer("_tokens", th.tensor(tokens))

    def forward(self, obs, deterministic=False, action_masks=None):
        self._read(obs)
        return super().forward(obs, deterministic, action_masks)

    def evaluate_actions(self, obs, actions, action_masks=None):
        self._read(obs)
        return super().evaluate_actions(obs, actions, action_masks)

    def get_distribution(self, obs, action_masks=None):
        self._read(obs)
        return super().get_distribution(obs, action_masks)

    def _read(self, obs: th.Tensor) -> None:
        rows, c = self.codec.max_len + 1, self.row_size
        obs = obs.float()
        if obs.dim() == 3:  # positions: the block ends each row
            self._rows = obs[..., -c:]
        else:
            self._rows = obs[..., -rows * c :].unflatten(-1, (rows, c))  # (B, rows, c)

    def _get_action_dist_from_latent(self, latent_pi: th.Tensor):
        k, rows = self.codec.n_tokens, self._rows  # (B, L + 1, 3k + 4)
        B, E = latent_pi.shape[0], len(self._positions)
        at = rows[:, self._positions]  # (B, E, 3k + 4): the row of each edit's position
        written = at[..., : 3 * k].unflatten(-1, (k, 3))  # (B, E, k, 3)
        index = self._tokens.clamp(min=0)[None, :, None, None].expand(B, E, 1, 3)
        token = written.gather(2, index)[:, :, 0] * (self._tokens >= 0)[None, :, None]
        own = th.cat(  # each edit's own numbers, after the latent in edit_net's input
            [
                self._kinds[None].expand(B, E, 3),
                (self._positions.float() / self.codec.max_len)[None, :, None].expand(B, E, 1),
                token,
                at[..., 3 * k :],
            ],
            dim=-1,
        )
        # edit_net on [latent, own], its first layer split by columns: the latent's part is one
        # product per observation, not one per edit (~150 edits)
        first, d = self.edit_net[0], latent_pi.shape[-1]
        hidden = F.linear(own, first.weight[:, d:], first.bias)
        hidden = hidden + F.linear(latent_pi, first.weight[:, :d])[:, None]
        edits = self.edit_net[1:](hidden).squeeze(-1)  # (B, E)
        logits = th.cat([self.stop_net(latent_pi), edits], dim=-1)
        return self.action_dist.proba_distribution(action_logits=logits)
