"""Wrappers that adapt the environments to agents with narrower needs.

* :class:`FlattenEditActions`: an edit env's ``MultiDiscrete`` action as one ``Discrete`` with an
  exact action mask (tabular Q-learning, SB3 PPO, MaskablePPO).
* :class:`DiscretizeObservation`: the hidden-state ``Box`` as a ``Discrete`` state for tabular
  agents, by a seeded random-hyperplane hash or a k-means codebook.

Together with ``action_mode="topk"`` (small ``k``) they make every env tabular-ready.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from textenvs.envs.edit import EditActionCodec

DISCRETIZE_METHODS = ("hash", "kmeans")


class FlattenEditActions(gym.ActionWrapper):
    """Turn an edit env's ``MultiDiscrete([4, L + 1, K])`` space into one ``Discrete`` with an exact
    mask, one index per distinct edit (:class:`~textenvs.envs.edit.EditActionCodec`).

    ``action_masks()`` returns one boolean per action, exactly the edits the env would apply
    (sb3-contrib's MaskablePPO reads it through the wrapper). The same space and mask are the edit
    envs' ``flat_actions=True`` keyword, which also works in the batched vector env.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        space = env.action_space
        if not (
            isinstance(space, spaces.MultiDiscrete) and space.shape == (3,) and space.nvec[0] == 4
        ):
            raise ValueError(
                "FlattenEditActions needs an edit env with MultiDiscrete([4, max_len + 1, "
                f"n_tokens]) actions, got {space}: wrap a textenvs edit env (textenvs/Edit*-v0) "
                "made without flat_actions=True."
            )
        self.max_len, self.n_tokens = int(space.nvec[1]) - 1, int(space.nvec[2])
        self.codec = EditActionCodec(self.max_len, self.n_tokens)
        self.action_space = spaces.Discrete(self.codec.n)

    def action(self, action: Any) -> np.ndarray:
        if not (
            np.ndim(action) == 0
            and self.action_space.contains(np.int64(action))
            and float(action) == int(action)
        ):
            raise ValueError(
                f"Action {action!r} is not in the action space {self.action_space}: give an "
                "integer index."
            )
        return np.array(self.unflatten(int(action)), dtype=np.int64)

    def unflatten(self, a: int) -> tuple[int, int, int]:
        return self.codec.unflatten(a)

    def flatten(self, op: int, position: int, token: int) -> int:
        return self.codec.flatten(op, position, token)

    def action_masks(self) -> np.ndarray:
        env = self.env.unwrapped
        # ResetNeeded before reset; the token mask is the same at every position
        tokens = env.action_masks()[-self.n_tokens :]
        return self.codec.mask(len(env.text_ids), tokens)


def sample_observations(env: gym.Env, n: int, seed: int) -> np.ndarray:
    """``n`` observations of ``env`` under a uniformly random (masked, where the env has masks)
    policy.
    """
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    samples = [np.asarray(obs, dtype=np.float32).reshape(-1)]
    masks = find_action_masks(env)
    while len(samples) < n:
        if masks is not None and isinstance(env.action_space, spaces.Discrete):
            action = int(rng.choice(np.flatnonzero(masks())))
        else:
            action = _random_action(env.action_space, rng)
        obs, _, terminated, truncated, _ = env.step(action)
        samples.append(np.asarray(obs, dtype=np.float32).reshape(-1))
        if terminated or truncated:
            obs, _ = env.reset()
            samples.append(np.asarray(obs, dtype=np.float32).reshape(-1))
    return np.stack(samples[:n])


def _random_action(space: spaces.Space, rng: np.random.Generator):
    if isinstance(space, spaces.Discrete):
        return int(space.start + rng.integers(space.n))
    if isinstance(space, spaces.MultiDiscrete):
        return rng.integers(space.nvec)
    raise ValueError(
        f"Cannot sample random actions from {space}: use a Discrete or MultiDiscrete action space."
    )


def _is_int(value: object) -> bool:
    """An int that is not a bool (True would pass for 1)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


class DiscretizeObservation(gym.ObservationWrapper):
    """Map the hidden-state observation to a ``Discrete`` state for tabular agents.

    The discretizer is fitted once, at construction, on ``n_fit`` observations the env produces
    under a random policy from ``reset(seed=seed)`` (reset the env again before training).

    * ``method="hash"``: ``n_bits`` seeded random hyperplanes through the mean of the fitted
      observations; the state is the sign pattern, ``Discrete(2 ** n_bits)``. Cheap, no fitting
      beyond the mean, and nearby hidden states tend to share a state; but the hyperplanes ignore
      where the data lie, so many of the ``2 ** n_bits`` states stay empty while others are crowded.
    * ``method="kmeans"``: a codebook of ``n_clusters`` centroids fitted with scikit-learn's
      ``KMeans`` (seeded); the state is the nearest centroid, ``Discrete(n_clusters)``. It spends
      its
      states where the hidden states actually are, at the cost of fitting and of one distance
      computation per step; states never seen during fitting fall into the nearest cluster.

    The map is deterministic for a seed. ``fitted=`` reuses the map of another instance (fit on the
    train split, evaluate on the test split). ``action_masks()`` is passed through from the env.
    """

    def __init__(
        self,
        env: gym.Env,
        method: str = "hash",
        n_bits: int = 8,
        n_clusters: int = 64,
        n_fit: int = 512,
        seed: int = 0,
        fitted: DiscretizeObservation | None = None,
    ) -> None:
        super().__init__(env)
        if fitted is not None:  # reuse a map fitted on another env (train split -> test split)
            if fitted.observation_space_in != env.observation_space:
                raise ValueError(
                    f"The fitted discretizer expects {fitted.observation_space_in}, the env gives "
                    f"{env.observation_space}."
                )
            self.__dict__.update({k: v for k, v in vars(fitted).items() if k in self._FITTED})
            self.observation_space_in = env.observation_space
            return
        self.observation_space_in = env.observation_space
        if method not in DISCRETIZE_METHODS:
            raise ValueError(
                f"method={method!r} is not valid: choose one of {list(DISCRETIZE_METHODS)}."
            )
        if not isinstance(env.observation_space, spaces.Box):
            raise ValueError(
                f"DiscretizeObservation needs a Box observation space, got {env.observation_space}."
            )
        if method == "hash" and not (_is_int(n_bits) and 1 <= n_bits <= 24):
            raise ValueError(
                f"n_bits must be an int in [1, 24] (2 ** n_bits states), got {n_bits!r}."
            )
        if method == "kmeans" and not (_is_int(n_clusters) and 2 <= n_clusters <= n_fit):
            raise ValueError(
                f"n_clusters must be an int in [2, n_fit={n_fit}], got {n_clusters!r}."
            )
        self.method, self.seed = method, seed
        samples = sample_observations(env, n_fit, seed)  # (n_fit, D)
        self.mean = samples.mean(0)
        if method == "hash":
            self.planes = (
                np.random.default_rng(seed)
                .standard_normal((n_bits, samples.shape[1]))
                .astype(np.float32)
            )
            self._powers = 1 << np.arange(n_bits, dtype=np.int64)
            self.observation_space = spaces.Discrete(2**n_bits)
        else:
            from sklearn.cluster import KMeans

            kmeans = KMeans(n_clusters=n_clusters, random_state=seed, n_init=3).fit(samples)
            self.centroids = kmeans.cluster_centers_.astype(np.float32)  # (n_clusters, D)
            self.observation_space = spaces.Discrete(n_clusters)

    _FITTED = ("method", "seed", "mean", "planes", "_powers", "centroids", "_observation_space")

    def observation(self, observation: np.ndarray) -> int:
        flat = np.asarray(observation, dtype=np.float32).reshape(1, -1)
        if self.method == "hash":
            bits = (flat - self.mean) @ self.planes.T > 0  # (1, n_bits)
            return int(bits[0].astype(np.int64) @ self._powers)
        # the nearest centroid (what KMeans.predict computes), from arrays that save without pickle
        return int(((self.centroids - flat) ** 2).sum(1).argmin())

    def state(self) -> dict[str, np.ndarray]:
        """The fitted map as plain arrays (``np.savez``-able, no pickle); see :meth:`from_state`."""
        state = {"method": np.array(self.method), "seed": np.array(self.seed), "mean": self.mean}
        if self.method == "hash":
            state["planes"] = self.planes
        else:
            state["centroids"] = self.centroids
        return state

    @classmethod
    def from_state(cls, env: gym.Env, state: dict[str, np.ndarray]) -> DiscretizeObservation:
        """The discretizer of :meth:`state` around ``env``, with no fitting; a clear error names
        the field that does not fit."""
        method = str(state.get("method", ""))
        if method not in DISCRETIZE_METHODS:
            raise ValueError(f"discretizer field 'method' is {method!r}: not one of hash/kmeans.")
        dim = int(np.prod(env.observation_space.shape))
        table = "planes" if method == "hash" else "centroids"
        for name, ndim in (("mean", 1), (table, 2)):
            value = state.get(name)
            if (
                not isinstance(value, np.ndarray)
                or value.ndim != ndim
                or value.shape[-1] != dim
                or not np.issubdtype(value.dtype, np.floating)
                or not np.isfinite(value).all()
            ):
                raise ValueError(
                    f"discretizer field {name!r} must be finite floats with last dimension {dim} "
                    f"(the env's observation size), got {getattr(value, 'shape', value)!r}."
                )
        self = cls.__new__(cls)
        gym.ObservationWrapper.__init__(self, env)
        self.observation_space_in = env.observation_space
        self.method, self.seed = method, int(state.get("seed", 0))
        self.mean = state["mean"].astype(np.float32)
        if method == "hash":
            self.planes = state["planes"].astype(np.float32)
            if not 1 <= len(self.planes) <= 24:
                raise ValueError("discretizer field 'planes' must hold 1 to 24 hyperplanes.")
            self._powers = 1 << np.arange(len(self.planes), dtype=np.int64)
            self.observation_space = spaces.Discrete(2 ** len(self.planes))
        else:
            self.centroids = state["centroids"].astype(np.float32)
            self.observation_space = spaces.Discrete(len(self.centroids))
        return self

    def action_masks(self) -> np.ndarray:
        masks = find_action_masks(self.env)
        if masks is None:
            raise AttributeError(f"{self.env} has no action_masks().")
        return masks()


def find_action_masks(env: gym.Env):
    """The outermost ``action_masks`` callable along the wrapper chain that works, or None.

    Wrappers that only pass masks through (DiscretizeObservation) are skipped when the env below
    them has none; the outermost one wins, so FlattenEditActions' flat mask hides the edit env's
    per-dimension mask.
    """
    e = env
    while e is not None:
        if isinstance(e, DiscretizeObservation):
            e = e.env
            continue
        if callable(getattr(type(e), "action_masks", None)):
            return e.action_masks
        e = getattr(e, "env", None)
    return None
