"""Stable-Baselines3 ``VecEnv`` adapter over a gymnasium vector env (imported only when SB3 is
used).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv

try:
    from stable_baselines3.common.vec_env import VecEnv
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("as_sb3_vec_env needs Stable-Baselines3: pip install 'textenvs[sb3]'.") from e


def _unbatch_info(infos: dict, i: int) -> dict:
    """Sub-env ``i``'s entries of a gymnasium vector info dict (``key`` / ``_key`` mask pairs)."""
    out = {}
    for key, value in infos.items():
        if key.startswith("_"):
            continue
        present = infos.get(f"_{key}")
        if present is not None and not present[i]:
            continue
        out[key] = _unbatch_info(value, i) if isinstance(value, dict) else value[i]
    return out


class SB3VecEnvAdapter(VecEnv):
    """SB3's ``VecEnv`` API (dones, ``terminal_observation``, ``TimeLimit.truncated``) over a
    gymnasium vector env in any autoreset mode.

    ``SameStep``: the env restarts an ended sub-env itself and reports the episode's end in
    ``final_obs`` / ``final_info``. ``NextStep`` and ``Disabled``: the step's observation and info
    are the episode's last, and the adapter restarts the ended sub-envs in the same call with one
    partial ``reset(options={"reset_mask": dones})`` (a batched env prefills them together). The
    batched textenvs envs keep their single batched forward per step underneath."""

    def __init__(self, envs: VectorEnv) -> None:
        mode = envs.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        try:
            self._same_step = AutoresetMode(mode) == AutoresetMode.SAME_STEP
        except ValueError as e:
            raise ValueError(
                f"as_sb3_vec_env: metadata['autoreset_mode']={mode!r} is not a "
                "gymnasium.vector.AutoresetMode."
            ) from e
        self.vector_env = envs
        super().__init__(envs.num_envs, envs.single_observation_space, envs.single_action_space)
        self._actions: np.ndarray | None = None

    def reset(self):
        seeds = [s if s is None else int(s) for s in self._seeds]
        options = (
            self._options[0]
            if self._options and all(o == self._options[0] for o in self._options)
            else None
        )
        obs, infos = self.vector_env.reset(
            seed=seeds if any(s is not None for s in seeds) else None, options=options
        )
        self.reset_infos = [_unbatch_info(infos, i) for i in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self):
        obs, rewards, terminated, truncated, infos = self.vector_env.step(self._actions)
        dones = terminated | truncated
        step_infos = [_unbatch_info(infos, i) for i in range(self.num_envs)]
        # episode ends: {i: (last obs, last info, the new episode's reset info)}
        if self._same_step:
            ends = {
                i: (
                    step_infos[i].pop("final_obs"),
                    step_infos[i].pop("final_info", {}),
                    step_infos[i],
                )
                for i in np.flatnonzero(dones)
            }
        elif dones.any():
            new_obs, reset_infos = self.vector_env.reset(options={"reset_mask": dones.copy()})
            ends = {
                i: (obs[i], step_infos[i], _unbatch_info(reset_infos, i))
                for i in np.flatnonzero(dones)
            }
            obs = np.where(dones.reshape(-1, *[1] * (obs.ndim - 1)), new_obs, obs)
        else:
            ends = {}
        out = []
        for i, info in enumerate(step_infos):
            if i in ends:
                last_obs, info, self.reset_infos[i] = ends[i]
                info = {**info, "terminal_observation": last_obs}
            info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            out.append(info)
        return obs, rewards.astype(np.float32), dones, out

    def close(self) -> None:
        self.vector_env.close()

    def _indices(self, indices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        return [indices] if isinstance(indices, int) else list(indices)

    def _sub_envs(self, indices) -> list[Any]:
        """The selected sub-envs themselves (batched and sync vector envs hold them in ``envs``)."""
        envs = getattr(self.vector_env, "envs", None)
        if envs is None:
            raise NotImplementedError(
                f"{type(self.vector_env).__name__} does not expose its sub-envs, so a call on some "
                "of them (indices=...) cannot be honoured: call all of them (indices=None), or "
                "use a textenvs batched or gymnasium sync vector env."
            )
        return [envs[i] for i in self._indices(indices)]

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        if indices is None:
            return list(self.vector_env.get_attr(attr_name))
        return [getattr(env, attr_name) for env in self._sub_envs(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        if indices is None:
            self.vector_env.set_attr(attr_name, [value] * self.num_envs)
            return
        for env in self._sub_envs(indices):
            setattr(env, attr_name, value)

    def env_method(
        self, method_name: str, *method_args, indices=None, **method_kwargs
    ) -> list[Any]:
        """Call a method of the sub-envs ``indices`` only (SB3's VecEnv contract)."""
        if indices is None:
            return list(self.vector_env.call(method_name, *method_args, **method_kwargs))
        return [
            getattr(env, method_name)(*method_args, **method_kwargs)
            for env in self._sub_envs(indices)
        ]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False for _ in self._indices(indices)]
