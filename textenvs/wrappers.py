"""Wrappers that adapt the environments to agents with narrower needs."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from textenvs.envs.edit import DELETE, INSERT, REPLACE, STOP


class FlattenEditActions(gym.ActionWrapper):
    """Turn an edit env's ``MultiDiscrete([4, L + 1, K])`` space into one ``Discrete`` with an exact mask.

    Only distinct edits are enumerated (delete needs no token, stop no position or token)::

        0                                  stop
        1 + p * K + t                      insert token t before position p   (p in 0..L)
        1 + (L + 1) K + p                  delete position p                  (p in 0..L-1)
        1 + (L + 1) K + L + p * K + t      replace position p by token t      (p in 0..L-1)

    so ``n = 1 + (L + 1) K + L + L K``. ``action_masks()`` returns one boolean per action,
    exactly the edits the env would apply (sb3-contrib's MaskablePPO reads it through the wrapper).
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        space = env.action_space
        if not (isinstance(space, spaces.MultiDiscrete) and space.shape == (3,) and space.nvec[0] == 4):
            raise ValueError(
                f"FlattenEditActions needs an edit env with MultiDiscrete([4, max_len + 1, n_tokens]) actions, "
                f"got {space}: wrap a textenvs edit env (textenvs/Edit*-v0)."
            )
        self.max_len, self.n_tokens = int(space.nvec[1]) - 1, int(space.nvec[2])
        L, K = self.max_len, self.n_tokens
        self._delete0 = 1 + (L + 1) * K
        self._replace0 = self._delete0 + L
        self.action_space = spaces.Discrete(self._replace0 + L * K)

    def action(self, action: Any) -> np.ndarray:
        if not (np.ndim(action) == 0 and self.action_space.contains(np.int64(action)) and float(action) == int(action)):
            raise ValueError(f"Action {action!r} is not in the action space {self.action_space}: give an integer index.")
        return np.array(self.unflatten(int(action)), dtype=np.int64)

    def unflatten(self, a: int) -> tuple[int, int, int]:
        K = self.n_tokens
        if a == 0:
            return STOP, 0, 0
        if a < self._delete0:
            return INSERT, (a - 1) // K, (a - 1) % K
        if a < self._replace0:
            return DELETE, a - self._delete0, 0
        return REPLACE, (a - self._replace0) // K, (a - self._replace0) % K

    def flatten(self, op: int, position: int, token: int) -> int:
        K = self.n_tokens
        if op == STOP:
            return 0
        if op == INSERT:
            return 1 + position * K + token
        if op == DELETE:
            return self._delete0 + position
        return self._replace0 + position * K + token

    def action_masks(self) -> np.ndarray:
        env = self.env.unwrapped
        n, K = len(env.text_ids), self.n_tokens
        tokens = env.action_masks()[-K:]  # token validity does not depend on the position
        mask = np.zeros(self.action_space.n, dtype=bool)
        mask[0] = True
        if n < self.max_len:
            mask[1 : 1 + (n + 1) * K] = np.tile(tokens, n + 1)
        mask[self._delete0 : self._delete0 + n] = True
        mask[self._replace0 : self._replace0 + n * K] = np.tile(tokens, n)
        return mask
